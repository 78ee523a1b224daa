"""Strategic-gram lexicons: loading, matching on every tokenizer convention, mining."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import entropylens as el
from entropylens.analysis.lexicon import default_lexicon
from entropylens.analysis.lexicon_matching import PlanningMatcher
from entropylens.analysis.lexicon_mining import FUNCTION_WORDS
from entropylens.base.pieces import detect_convention, token_bytes
from entropylens.errors import EntropylensError
from entropylens.store import Store

from roles_reference import reference_spans


def _planning_words(match, tokens):
    return [t for t, flag in zip(tokens, match.planning) if flag]


# -- lexicons ---------------------------------------------------------------------------

def test_default_lexicon_is_the_published_list(shared_samples):
    lexicon = default_lexicon()
    assert len(lexicon) == 249
    lines = (shared_samples / "strategic_grams_hicra.txt").read_text().splitlines()
    published = [" ".join(line.split()) for line in lines if line and not line.startswith("# ")]
    assert list(lexicon.phrases) == published
    assert {"## step", "but wait", "let's", "hmm,", "does this make sense?"} <= set(lexicon)


def test_no_published_gram_is_made_of_function_words_only():
    for phrase in default_lexicon():
        words = re.findall(r"\w+(?:'\w+)*", phrase)
        assert not all(w in FUNCTION_WORDS or len(w) == 1 for w in words), phrase


def test_load_lexicon_replace_extend_and_normalise(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my grams\n\nLet   me  think\nlet me think\nOK so\n#\nit’s clear\n",
                    encoding="utf-8")
    replaced = el.load_lexicon(path)
    assert replaced.phrases == ("let me think", "ok so", "it's clear")
    extended = el.load_lexicon(path, mode="extend")
    assert len(extended) == 249 + 3 and extended.phrases[-1] == "it's clear"
    assert el.load_lexicon(["Wait", "wait", "so"]).phrases == ("wait", "so")


def test_bad_lexicons_name_the_file_and_line(tmp_path):
    with pytest.raises(EntropylensError, match="missing.txt: cannot read"):
        el.load_lexicon(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"so\nnow\n\xff\xfe wait\n")
    with pytest.raises(EntropylensError, match=r"bad.txt:3: the lexicon is not UTF-8"):
        el.load_lexicon(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(EntropylensError, match="holds no phrases"):
        el.load_lexicon(empty)
    with pytest.raises(EntropylensError, match="lexicon mode"):
        el.load_lexicon(None, mode="merge")


# -- matching on each tokenizer convention --------------------------------------------------

def test_bytelevel_tokens_across_boundaries_and_split_characters():
    # "’" is e2 80 99; byte-level BPE shows it as "âĢĻ" and may split it between tokens.
    tokens = ["In", "Ġthis", ",", "Ġlet", "âĢ", "Ļs", "Ġgo", ".", "ĊĊ", "But", "Ġwa", "it",
              ",", "Ġalso", "Ġreason", "<|im_end|>"]
    assert detect_convention(tokens) == "bytelevel"
    match = el.match_planning_tokens(tokens)
    assert match.texts == ["In this, let’s go.\n\nBut wait, also reason<|im_end|>"]
    assert match.grams["gram"].tolist() == ["let's", "but wait"]
    assert _planning_words(match, tokens) == ["Ġlet", "âĢ", "Ļs", "But", "Ġwa", "it"]


def test_sentencepiece_tokens_with_byte_fallback():
    tokens = ["▁So", "<0x0A>", "▁let", "<0xE2>", "<0x80>", "<0x99>", "s", "▁check",
              "▁now", "<0x0A>", "Wait", ",", "▁no"]
    assert detect_convention(tokens) == "sentencepiece"
    match = el.match_planning_tokens(tokens)
    assert match.texts == [" So\n let’s check now\nWait, no"]
    assert match.grams["gram"].tolist() == ["so", "let's", "now", "wait, no"]
    assert _planning_words(match, tokens) == ["▁So", "▁let", "<0xE2>", "<0x80>", "<0x99>",
                                              "s", "▁now", "Wait", ",", "▁no"]


def test_plain_text_tokens_and_openai_byte_pieces():
    tokens = ["Hmm", ",", " the", " key", " insight", " is", " that", " ", "bytes:\\xe2\\x80",
              "bytes:\\x99", "Thus", "Sonow"]
    assert detect_convention(tokens) == "text"
    assert token_bytes("bytes:\\xe2\\x80", "text") == b"\xe2\x80"
    match = el.match_planning_tokens(tokens, convention="text")
    assert match.texts == ["Hmm, the key insight is that ’ThusSonow"]
    # "thus" touches "Sonow" (no word boundary), and "so"/"now" sit inside a word.
    assert match.grams["gram"].tolist() == ["hmm,", "the key insight is"]
    assert _planning_words(match, tokens) == ["Hmm", ",", " the", " key", " insight", " is"]


def test_case_whitespace_and_longest_match():
    tokens = ["BUT", "  WAIT", "\n\nlet", "\tme", " verify", " but", " ", "why"]
    match = el.match_planning_tokens(tokens, convention="text")
    # "but wait" beats "but"; "let me verify" beats "let me"; runs of whitespace match a space.
    assert match.grams["gram"].tolist() == ["but wait", "let me verify", "but why"]
    assert match.planning.all()
    unmatched = el.match_planning_tokens(["sonic", " nowhere", " butter", " x_so"],
                                         convention="text")
    assert not unmatched.planning.any()


def test_table_input_keeps_row_order_and_sequence_boundaries():
    # Two sequences given out of order: "... but" ends one and "wait ..." starts the other.
    table = pd.DataFrame({"step": [1, 1, 1, 1, 1],
                          "sample_id": ["b", "a", "b", "a", "a"],
                          "position": [0, 1, 1, 0, 2],
                          "token": ["wait", " and", " see", "yes", " but"]})
    match = el.match_planning_tokens(table, convention="text")
    assert match.planning.tolist() == [True, False, False, False, True]
    assert sorted(match.grams["gram"]) == ["but", "wait"]
    assert match.texts == ["yes and but", "wait see"]


def test_custom_lexicon_and_phrases_without_word_edges():
    match = el.match_planning_tokens(["##", " Step", " 1", ":", " first"],
                                     lexicon=["## step"], convention="text")
    assert match.planning.tolist() == [True, True, False, False, False]
    match = el.match_planning_tokens(["no", "pe", "?", "!"], lexicon=["nope?"],
                                     convention="text")
    assert match.planning.tolist() == [True, True, True, False]


def test_matcher_equals_plain_scanning_on_real_completions(shared_run):
    completions = pq.read_table(shared_run / "top20" / "sequences.parquet",
                                columns=["completion"]).column("completion").to_pylist()
    completions = completions[::7]
    lexicon = default_lexicon()
    result = PlanningMatcher(lexicon, "text").match(completions, np.arange(len(completions)))
    got = Counter()
    for seq, gram in zip(result.sequence, result.gram):
        got[(int(seq), lexicon.phrases[gram])] += 1
    expected = Counter()
    for k, text in enumerate(completions):
        for _, _, phrase in reference_spans(text, lexicon.phrases):
            expected[(k, phrase)] += 1
    assert sum(expected.values()) > 500
    assert got == expected


def test_bytelevel_decoding_reproduces_the_real_completions(shared_run):
    tokens = pq.read_table(shared_run / "vanilla" / "tokens.parquet",
                           columns=["step", "prompt_idx", "sample_idx", "position", "token"])
    sequences = pq.read_table(shared_run / "vanilla" / "sequences.parquet",
                              columns=["step", "prompt_idx", "sample_idx", "completion"])
    frame = tokens.to_pandas()
    frame["sample_id"] = frame["prompt_idx"].astype(str) + ":" + frame["sample_idx"].astype(str)
    # Completions whose tokens hold multi-byte characters, several split across tokens.
    non_ascii = frame[frame["token"].map(lambda t: any(ord(c) > 127 and c not in "ĠĊ"
                                                       for c in t))]
    keys = non_ascii[["step", "sample_id"]].drop_duplicates().head(60)
    subset = frame.merge(keys, on=["step", "sample_id"])
    match = el.match_planning_tokens(subset[["step", "sample_id", "position", "token"]])
    assert match.convention == "bytelevel" and len(keys) >= 20
    seq = sequences.to_pandas()
    seq["sample_id"] = seq["prompt_idx"].astype(str) + ":" + seq["sample_idx"].astype(str)
    completions = seq.set_index(["step", "sample_id"])["completion"]
    ordered = subset.sort_values(["step", "sample_id"])[["step", "sample_id"]] \
        .drop_duplicates().itertuples(index=False)
    for text, (step, sample_id) in zip(match.texts, ordered):
        completion = completions.loc[(step, sample_id)]
        assert text.startswith(completion), (step, sample_id)
        assert "\ufffd" not in text


# -- mining -------------------------------------------------------------------------------

def _sequence_store(tmp_path, rows) -> Store:
    store = Store.create(tmp_path / "store")
    with store.write_run("r") as writer:
        writer.write_sequences(pa.Table.from_pylist(rows))
    return store


def test_mine_lexicon_counts_documents_and_sparsity(tmp_path):
    prompt = "Tom has 3 apples. How many apples?"
    rows = [
        {"step": 0, "sample_id": "a", "prompt": prompt, "reward": 1.0,
         "completion": "So let's see. Tom has 3 apples, so the answer is 3."},
        {"step": 0, "sample_id": "b", "prompt": prompt, "reward": 1.0,
         "completion": "Let's see: wait, the apples are 3. The answer is 3."},
        {"step": 0, "sample_id": "c", "prompt": prompt, "reward": 1.0,
         "completion": "Wait, but 3 apples. Let's see it."},
        {"step": 0, "sample_id": "d", "prompt": prompt, "reward": 0.0,
         "completion": "Let's see. Maybe 4."},
    ]
    mined = el.mine_lexicon(_sequence_store(tmp_path, rows), min_df=0.5, top_n=50)
    assert mined.documents == 3 and mined.others == 1
    table = mined.table.set_index("gram")
    # "let's see" is in all three solutions, once each; "let's" only ever occurs inside it.
    assert table.loc["let's see", "solutions"] == 3
    assert table.loc["let's see", "score"] == pytest.approx(1.0)
    assert table.loc["let's see", "df_other"] == pytest.approx(1.0)
    assert "let's" not in table.index
    # "so" occurs twice in one solution: df 1/3 is below min_df 0.5.
    assert "so" not in table.index
    # "wait" is in two solutions once each; "apples" is prompt text; "the" a function word.
    assert table.loc["wait", "df"] == pytest.approx(2 / 3)
    assert table.loc["wait", "score"] == pytest.approx(2 / 3)
    assert "apples" not in table.index and "the" not in table.index
    assert table.loc["the answer is", "solutions"] == 2
    assert mined.phrases[0] == "let's see"
    # The written file is a lexicon that roles can read back.
    path = mined.write(tmp_path / "mined.txt")
    assert el.load_lexicon(path).phrases == tuple(mined.phrases)


def test_mine_lexicon_sparsity_ranks_repeated_grams_lower(tmp_path):
    rows = [{"step": 0, "sample_id": str(i), "prompt": "p", "reward": 1.0,
             "completion": ("first we add. " + "we add. " * (i % 3)) + "now check."}
            for i in range(6)]
    table = el.mine_lexicon(_sequence_store(tmp_path, rows), min_df=0.1).table
    table = table.set_index("gram")
    occurrences = sum(1 + i % 3 for i in range(6))
    assert table.loc["we add", "occurrences"] == occurrences
    assert table.loc["we add", "score"] == pytest.approx(6 / occurrences)
    assert table.loc["now check", "score"] == pytest.approx(1.0)
    assert table.index.get_loc("now check") < table.index.get_loc("we add")


def test_mine_lexicon_without_solutions_fails_clearly(tmp_path):
    rows = [{"step": 0, "sample_id": "a", "prompt": "p", "reward": 0.0, "completion": "no"}]
    with pytest.raises(EntropylensError, match="no completion with a reward above 0.5"):
        el.mine_lexicon(_sequence_store(tmp_path, rows))


def test_mine_lexicon_on_the_shared_run_finds_discourse_markers(shared_store):
    mined = el.mine_lexicon(shared_store, "top20", min_df=0.02, top_n=20)
    assert mined.documents > 50
    assert {"so", "let's", "now"} <= set(mined.phrases[:10])
    assert not set(mined.phrases) & FUNCTION_WORDS
