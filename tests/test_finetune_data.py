"""Fine-tuning data: formats, loss masks, truncation, packing, batching (lomo_kernels.finetune)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import finetune_fixtures as ff  # noqa: E402
from lomo_kernels.finetune import data as fd  # noqa: E402
from lomo_kernels.finetune.batches import ExampleStream, collate  # noqa: E402
from lomo_kernels.finetune.errors import UsageError  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return ff.make_tokenizer()


def _decode_labelled(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_prompt_completion_masks_the_prompt(tok):
    ex = fd.Encoder(tok).prompt_completion("swap red cat ->", " cat red", "row 1")
    p = tok("swap red cat ->")["input_ids"]
    c = tok(" cat red", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p + c + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(p) + c + [tok.eos_token_id]
    assert ex.prompt_ids == p and ex.answer == " cat red"
    everything = fd.Encoder(tok, train_on_prompt=True).prompt_completion("swap red cat ->",
                                                                         " cat red", "row 1")
    assert everything.labels == everything.input_ids == ex.input_ids


def test_chat_labels_only_the_assistant_turns(tok):
    messages = ff.chat_rows(1)[0]["messages"]
    ex = fd.Encoder(tok).chat(messages, "row 1")
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    # labelled: each assistant turn's content and its end-of-turn marker, nothing else
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _decode_labelled(tok, ex) == "".join(f"{t}<|im_end|>\n" for t in turns)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] not in _decode_labelled(tok, ex)
    # generation starts after the last user turn, with the assistant header
    assert tok.decode(ex.prompt_ids).endswith("again<|im_end|>\n<|im_start|>assistant\n")
    assert ex.answer == turns[-1]
    assert fd.Encoder(tok, train_on_prompt=True).chat(messages, "r").labels == ex.input_ids


def test_prompt_completion_through_the_chat_template(tok):
    ex = fd.Encoder(tok, chat_template=True).prompt_completion("swap a b ->", "b a", "row 1")
    assert tok.decode(ex.input_ids) == ("<|im_start|>user\nswap a b -><|im_end|>\n"
                                        "<|im_start|>assistant\nb a<|im_end|>\n")
    assert _decode_labelled(tok, ex) == "b a<|im_end|>\n"


def test_text_trains_on_everything(tok):
    ex = fd.Encoder(tok).text("the red cat", "row 1")
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert ex.prompt_ids is None and ex.answer is None


def test_truncation_and_dropping_are_counted(tok):
    datasets = pytest.importorskip("datasets")
    long_prompt = "swap " + "red " * 40 + "->"
    rows = [{"prompt": "swap red cat ->", "completion": " cat red"},
            {"prompt": "swap red cat ->", "completion": " cat" * 40},  # truncated, kept
            {"prompt": long_prompt, "completion": " x"}]  # truncated inside the prompt: dropped
    out = fd.encode(datasets.Dataset.from_list(rows), fd.Encoder(tok), 16, "--data x")
    assert (out.rows, out.truncated, out.dropped, len(out.examples)) == (3, 2, 1, 2)
    assert all(len(ex.input_ids) <= 16 for ex in out.examples)
    with pytest.raises(UsageError, match="no example has a token to train on"):
        fd.encode(datasets.Dataset.from_list(rows[2:]), fd.Encoder(tok), 16, "--data x")


def test_packing_keeps_every_token_and_label(tok):
    exs = [fd.Encoder(tok).prompt_completion(p, c, "r") for p, c in ff.pairs(10)]
    blocks = fd.pack(exs, 16)
    assert all(len(b.input_ids) <= 16 for b in blocks) and len(blocks) < len(exs)
    assert [t for b in blocks for t in b.input_ids] == [t for e in exs for t in e.input_ids]
    assert [t for b in blocks for t in b.labels] == [t for e in exs for t in e.labels]


def test_format_detection_and_readers(tmp_path):
    datasets = pytest.importorskip("datasets")
    assert fd.detect_format(["prompt", "completion", "id"], "x") == "prompt_completion"
    assert fd.detect_format(["messages"], "x") == "chat"
    assert fd.detect_format(["text"], "x") == "text"
    with pytest.raises(UsageError, match=r"no known format in the columns \['input', 'output'\]"):
        fd.detect_format(["input", "output"], "--data f")
    rows = ff.pc_rows(5)
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ff.write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        got = fd.read_rows(str(tmp_path / name))
        assert got.to_list() == rows, name


def test_held_out_split_is_seeded_and_disjoint():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ff.pc_rows(40))
    a_train, a_eval = fd.split_rows(ds, 0.25, seed=3)
    b_train, b_eval = fd.split_rows(ds, 0.25, seed=3)
    assert len(a_eval) == 10 and len(a_train) == 30
    assert a_eval.to_list() == b_eval.to_list()
    assert not {r["prompt"] for r in a_eval} & {r["prompt"] for r in a_train}


def test_batches_pad_with_ignored_labels_and_split_over_ranks(tok):
    exs = [fd.Encoder(tok).prompt_completion(p, c, "r") for p, c in ff.pairs(7)]
    b = collate(exs[:3], tok.pad_token_id, "cpu")
    lengths = [len(e.input_ids) for e in exs[:3]]
    assert b["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (b["labels"][row, n:] == IGNORE).all()
        assert b["labels"][row, :n].tolist() == exs[row].labels
    # two ranks: disjoint halves of each global batch, the odd example count padded, the same
    # number of batches on each rank; one rank alone sees each example once per epoch
    streams = [ExampleStream(exs, 2, tok.pad_token_id, "cpu", seed=1, rank=r, world=2)
               for r in range(2)]
    assert streams[0].batches_per_epoch() == streams[1].batches_per_epoch() == 2
    seen = []
    for _ in range(2):
        for s in streams:
            seen += [tuple(r[m.bool()].tolist()) for r, m in
                     zip(*(lambda x: (x["input_ids"], x["attention_mask"]))(s.next()))]
    assert len(seen) == 8 and {tuple(e.input_ids) for e in exs} == set(seen)
    single = ExampleStream(exs, 3, tok.pad_token_id, "cpu", seed=1)
    order = []
    for _ in range(single.batches_per_epoch()):
        ids, mask = single.next()["input_ids"], None
        order += [tuple(t for t in r.tolist() if t != tok.pad_token_id) for r in ids]
    assert sorted(order) == sorted(tuple(e.input_ids) for e in exs)
    state = single.state_dict()
    nxt = single.next()["input_ids"]
    single.load_state_dict(state)
    assert torch.equal(single.next()["input_ids"], nxt)
