"""The bad-input matrix: each case ends in one line saying what was wrong and what to do, exit code 2,
and no store (or an untouched one)."""

from __future__ import annotations

import shutil

import pytest

from cli import main
from store.reader import open_store
from store.verify import verify_store


def _fails(args, message, capsys) -> str:
    capsys.readouterr()  # drop what building the test models printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


@pytest.fixture
def store(tmp_path):
    return tmp_path / "s.zarr"


def _capture(make_model, store, base=None, sft=None, *extra):
    return ["capture", "--base", str(base or make_model("llama", 0)), "--sft", str(sft or make_model("llama", 1)),
            "--store", str(store), "--quiet", "--prompt", "hello world", *extra]


@pytest.mark.parametrize(("overrides", "what"), [
    ({"hidden_size": 48}, "hidden"), ({"num_hidden_layers": 2}, "layer"), ({"vocab_size": 352}, "vocab"),
])
def test_models_of_different_shapes(make_model, store, overrides, what, capsys):
    err = _fails(_capture(make_model, store, sft=make_model("llama", 1, **overrides)), "cannot be swapped", capsys)
    assert what in err and not store.exists()


def test_hub_id_without_network(make_model, store, capsys):
    err = _fails(_capture(make_model, store, base="nobody-here/no-such-model"), "could not be fetched", capsys)
    assert "pass its local directory" in err and not store.exists()


def test_tokenizer_larger_than_the_models_vocab(make_model, store, capsys):
    small = make_model("llama", 0, vocab_size=64)
    args = _capture(make_model, store, base=small, sft=make_model("llama", 1, vocab_size=64))
    _fails(args, "embedding rows; pass the models' own tokenizer", capsys)
    assert not store.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--passes", "BB,BB"], "listed twice in --passes"),
    (["--passes", "BB,XY"], "unknown pass 'XY'"),
    (["--pass-pair", "BB-QQ"], "does not name two passes of the plan"),
    (["--max-tokens", "1"], "more than the limit of 1 (--max-tokens)"),
    (["--prompt", ""], "is empty"),
    (["--chunk-prompts", "0"], "--chunk-prompts must be at least 1"),
    (["--shard-size", "lots"], "--shard-size 'lots' is not a size"),
    (["--max-memory", "lots"], "--max-memory 'lots' is not a size"),
    (["--max-memory", "1MB"], "capture would need about"),
    (["--track", "no-such-piece-at-all"], "is not a piece of the tokenizer"),
])
def test_bad_options(make_model, store, extra, message, capsys):
    _fails(_capture(make_model, store, None, None, *extra), message, capsys)
    assert not store.exists()


def test_empty_prompts_file(make_model, store, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n")
    args = ["capture", "--base", str(make_model("llama", 0)), "--sft", str(make_model("llama", 1)), "--store",
            str(store), "--prompts-file", str(empty), "--quiet"]
    _fails(args, "no prompts to capture", capsys)
    assert not store.exists()


def test_non_finite_activations_are_reported_not_written(make_model, store, tmp_path, capsys):
    from tests.helpers import load

    dirs = []
    for seed in (0, 1):
        model = load(make_model("llama", seed))
        for block in model.model.layers:
            block.mlp.down_proj.weight.data *= 1e6  # float16 overflows in the first block
        model.save_pretrained(tmp_path / f"m{seed}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(make_model("llama", seed) / name, tmp_path / f"m{seed}")
        dirs.append(tmp_path / f"m{seed}")
    args = _capture(make_model, store, dirs[0], dirs[1], "--dtype", "float16", "--no-lens")
    err = _fails(args, "non-finite activation in pass BB, prompt 0, layer", capsys)
    assert "run with --dtype float32" in err
    assert not bool(open_store(store).done.values.any())  # nothing non-finite is marked done
    assert all("not done" in p for p in verify_store(store))


def test_report_and_store_errors(make_model, store, tmp_path, capsys):
    assert main(_capture(make_model, store, None, None, "--no-lens")) == 0
    capsys.readouterr()
    before = sorted(p.stat().st_mtime_ns for p in store.rglob("*"))
    _fails(["report", str(store), "--metric", "kl"], "this store has no data for metric 'kl'; lens statistics: none "
           "in this store (captured with --no-lens", capsys)
    _fails(["report", str(store), "--metric", "nope"], "unknown pairwise metric 'nope'", capsys)
    _fails(["report", str(store), "--pass-pair", "BB-XX"], "unknown pair 'BB-XX'", capsys)
    _fails(["report", str(store), "--record-type", "runs", "--pass", "XX"], "unknown pass 'XX'", capsys)
    assert sorted(p.stat().st_mtime_ns for p in store.rglob("*")) == before  # untouched
    (tmp_path / "plain").mkdir()
    _fails(["report", str(tmp_path / "plain")], "not a Zarr v3 store", capsys)
    _fails(["info", str(tmp_path / "missing.zarr")], "no resdiff store at", capsys)


def test_remote_code_is_not_run_without_the_flag(make_model, store, tmp_path, capsys):
    import json

    evil = tmp_path / "evil"
    shutil.copytree(make_model("llama", 0), evil)
    marker = tmp_path / "code-ran"
    (evil / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(config))
    main(_capture(make_model, store, evil, None, "--no-lens"))  # transformers may use its own class
    assert not marker.exists()  # the checkpoint's code never ran
    main(_capture(make_model, tmp_path / "t.zarr", evil, None, "--no-lens", "--trust-remote-code"))
    assert marker.exists()  # ... and runs only when asked


def test_names_never_escape_the_output_directory(tmp_path):
    from capture.settings import CaptureSettings, resolve_models
    from store.location import sanitize_label

    assert "/" not in sanitize_label("../../etc/passwd") and ".." not in sanitize_label("../../etc/passwd")
    resolved = resolve_models(CaptureSettings(base="../../a/../b", sft="/x/../../c"))
    assert "/" not in resolved.label and resolved.label.strip("._")


def test_store_of_a_newer_format_is_refused_untouched(tmp_path, capsys):
    from store.testing import write_tiny_store
    from store.writer import StoreWriter

    path = write_tiny_store(tmp_path / "s.zarr")
    StoreWriter(path).finalize({"resdiff_format_version": 99})
    before = sorted(p.stat().st_mtime_ns for p in path.rglob("*"))
    _fails(["report", str(path)], "format version 99 is newer than this resdiff reads", capsys)
    _fails(["export-json", str(path), "--out", str(tmp_path / "x")], "upgrade resdiff", capsys)
    assert sorted(p.stat().st_mtime_ns for p in path.rglob("*")) == before


def test_prompt_longer_than_the_models_context(make_model, store, capsys):
    long_prompt = "the lazy dog sleeps " * 60  # more tokens than max_position_embeddings (128)
    args = ["capture", "--base", str(make_model("llama", 0)), "--sft", str(make_model("llama", 1)), "--store",
            str(store), "--quiet", "--prompt", long_prompt]
    _fails(args, "more than the limit of 128 (the model's context length)", capsys)
    assert not store.exists()
    capsys.readouterr()
    assert main([*args, "--truncate", "--no-lens"]) == 0  # cut with a warning, when asked
    assert int(open_store(store).n_tokens.max()) == 128


@pytest.mark.parametrize(("name", "content", "message"), [
    ("sur.jsonl", b'{"text": "ok \\ud800 lone"}\n', "unpaired surrogate ('\\ud800' at character 3)"),
    ("chat.jsonl", b'{"messages": [{"role": "user", "content": "a \\udfff"}]}\n', "unpaired surrogate"),
    ("m.jsonl", b'{"messages": "hi"}\n', "a conversation must be a list of"),
    ("bad.parquet", b"not a parquet file", "as Parquet: "),
    ("q.csv", b'text\n"unterminated, row\nsecond\n', "not valid CSV"),
])
def test_bad_prompt_files_are_refused_in_one_line(make_model, store, tmp_path, name, content, message, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    _fails(_capture(make_model, store, None, None, "--prompts-file", str(path)), message, capsys)
    assert not store.exists()


@pytest.mark.parametrize(("device", "message"), [("tpu:7", "is not a device torch knows"),
                                                 ("meta", "resdiff captures on cpu or cuda")])
def test_unknown_devices_are_refused_before_any_store(make_model, store, device, message, capsys):
    _fails(_capture(make_model, store, None, None, "--device", device), message, capsys)
    assert not store.exists()


def test_a_failed_plot_adds_nothing_to_its_folder(tmp_path, monkeypatch, capsys):
    from analysis.report import plots
    from store.testing import write_tiny_store

    path = write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4))
    out = tmp_path / "plots"
    out.mkdir()
    (out / "mine.txt").write_text("kept")

    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(plots, "cp_plot", broken)
    assert main(["plot", str(path), "--out", str(out), "--quiet"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
