"""Loading a causal language model for rescoring, and computing logits block by block.

A model is a Hugging Face folder (``config.json`` plus weights) or a GGUF file, which
transformers dequantizes (it needs the ``gguf`` package). The forward pass runs the model's
backbone once; the output head is then applied to the positions that are scored only, one
block of positions at a time, so that at most ``block × V`` logits exist at once instead of
``batch × length × V``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EntropylensError
from ..ingest._io import sha256_file

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
DTYPES = ("float32", "bfloat16", "float16")


def require_torch():
    """Import torch and transformers, or explain how to install them."""
    try:
        import torch
        import transformers  # noqa: F401 - imported here to fail early with a clear message
    except ImportError as exc:
        raise EntropylensError(f"rescoring needs torch and transformers ({exc.name} is not "
                               "installed): pip install 'entropylens[torch]'") from None
    return torch


def resolve_model_path(path: str | Path) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` for a model folder, a GGUF file, or a folder holding one GGUF.

    Raises
    ------
    EntropylensError
        When the path does not exist or holds no model.
    """
    path = Path(path)
    if not path.exists():
        raise EntropylensError("no such model file or folder", path=path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EntropylensError("a model file must be a .gguf file (or pass the Hugging Face "
                                   "model folder)", path=path)
        return path.parent, path.name
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if ggufs:
        raise EntropylensError(f"the folder holds several GGUF files "
                               f"({', '.join(g.name for g in ggufs)}): pass one of them",
                               path=path)
    raise EntropylensError("not a model: no config.json and no .gguf file", path=path)


def pick_device(device: str | None) -> str:
    """``device`` checked, or CUDA when available and CPU otherwise."""
    torch = require_torch()
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EntropylensError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EntropylensError("device cuda was asked for but torch sees no CUDA device")
    return device


@dataclass
class ScoringModel:
    """A loaded model with its tokenizer, ready for :meth:`hidden` and :meth:`logits`.

    Attributes
    ----------
    model : transformers.PreTrainedModel
    tokenizer : transformers.PreTrainedTokenizerBase
    device : str
    path : Path
        The model folder or GGUF file.
    files : list of dict
        Weight files with their size and sha256 (for the run manifest).
    split_head : bool
        Whether logits are computed from hidden states block by block (True) or by the
        model's own forward pass (for models whose head does more than one linear layer,
        e.g. logit soft-capping, where the check at load time fails).
    """

    model: Any
    tokenizer: Any
    device: str
    path: Path
    files: list = field(default_factory=list)
    split_head: bool = True

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(self.model.config.vocab_size)

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def describe(self) -> dict:
        """Provenance for the manifest: path, weight files with sha256, class, dtype."""
        return {"path": str(self.path), "files": self.files,
                "sha256": self.files[0]["sha256"] if len(self.files) == 1 else None,
                "class": type(self.model).__name__, "dtype": str(self.model.dtype).replace(
                    "torch.", ""), "device": self.device, "vocab_size": self.vocab_size,
                "head": "blocked" if self.split_head else "full-forward"}

    # -- forward -----------------------------------------------------------------------
    def backbone(self):
        getter = getattr(self.model, "get_decoder", None)
        decoder = getter() if callable(getter) else None
        if decoder is None:
            decoder = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        return decoder

    def hidden(self, input_ids, attention_mask):
        """Final hidden states ``(batch, length, d)``, or full logits when the head is not split."""
        torch = require_torch()
        with torch.inference_mode():
            if self.split_head:
                out = self.backbone()(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False)
                return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits

    def logits(self, hidden_rows):
        """Logits of a block of rows of :meth:`hidden` (the identity when the head is not split)."""
        torch = require_torch()
        if not self.split_head:
            return hidden_rows
        with torch.inference_mode():
            return self.model.get_output_embeddings()(hidden_rows)

    def check_split_head(self) -> bool:
        """Check on a short input that backbone + head reproduces the model's logits."""
        torch = require_torch()
        head = self.model.get_output_embeddings()
        backbone = self.backbone()
        if head is None or backbone is None:
            return False
        ids = self.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids or [0]], device=self.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            try:
                out = backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                split = head(out.last_hidden_state if hasattr(out, "last_hidden_state")
                             else out[0]).float()
            except Exception:  # an unusual backbone signature: use the full forward
                return False
        if split.shape != full.shape:
            return False
        scale = float(full.abs().max()) or 1.0
        return float((split - full).abs().max()) <= 1e-3 * scale


def load_model(path: str | Path, *, device: str | None = None, dtype: str = "float32",
               tokenizer_path: str | Path | None = None) -> ScoringModel:
    """Load a causal LM and its tokenizer for scoring.

    Parameters
    ----------
    path : str or Path
        A Hugging Face model folder, a ``.gguf`` file, or a folder holding one ``.gguf`` file.
    device : {"cpu", "cuda"}, optional
        Default: CUDA when available, else CPU.
    dtype : {"float32", "bfloat16", "float16"}
        Weights dtype; scores are always computed in float32 from the logits.
    tokenizer_path : str or Path, optional
        Where to load the tokenizer from (default: the model).

    Raises
    ------
    EntropylensError
        When torch/transformers are missing, the path holds no model, or loading fails.
    """
    torch = require_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise EntropylensError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    folder, gguf = resolve_model_path(path)
    device = pick_device(device)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        if tokenizer_path is not None:
            tok_folder, tok_gguf = resolve_model_path(tokenizer_path)
            tokenizer = AutoTokenizer.from_pretrained(
                str(tok_folder), **({"gguf_file": tok_gguf} if tok_gguf else {}))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                     **kwargs)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EntropylensError(f"cannot load the model: {message}", path=path) from None
    model.to(device).eval()
    weights = [folder / gguf] if gguf else sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)
    files = [{"path": str(p.resolve()), "size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in weights]
    scoring = ScoringModel(model=model, tokenizer=tokenizer, device=device,
                           path=(folder / gguf) if gguf else folder, files=files)
    scoring.split_head = scoring.check_split_head()
    return scoring


def wrap_model(model, tokenizer, *, path: str | Path | None = None) -> ScoringModel:
    """A :class:`ScoringModel` around a model and tokenizer already in memory.

    For a checkpoint held by a training loop or loaded once and scored several times. The
    model stays on its device and in its mode; ``path`` is recorded as provenance only.
    """
    require_torch()
    if isinstance(model, ScoringModel):
        return model
    device = str(next(model.parameters()).device)
    name = path or getattr(model, "name_or_path", None) or type(model).__name__
    scoring = ScoringModel(model=model, tokenizer=tokenizer, device=device, path=Path(str(name)))
    scoring.split_head = scoring.check_split_head()
    return scoring
