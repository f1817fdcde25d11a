"""The command line, end to end on the embedded tiny pair (real models, real stores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cli import main
from store.reader import open_store
from store.testing import assert_stores_equal
from tests.helpers import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_store(tiny_pair, tmp_path_factory):
    _, _, cache = tiny_pair
    path = tmp_path_factory.mktemp("cli") / "tiny.zarr"
    assert main(["capture", "--pair", "tiny", "--cache-dir", str(cache), "--store", str(path), "--quiet"]) == 0
    return path


def test_capture_writes_a_complete_store(tiny_store, tiny_pair, capsys):
    ds = open_store(tiny_store)
    assert list(ds.pass_.values) == ["BB", "BS", "SB", "SS"]
    assert ds.sizes["prompt"] == 4 and ds.resid.dtype == np.float16
    assert bool(ds.done.all())
    # float16 residuals of BB agree with the base model's own hidden states.
    from transformers import AutoTokenizer

    base_dir = tiny_pair[0]
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = str(ds.prompt_text.values[1])
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = load(base_dir)(input_ids=ids, output_hidden_states=True).hidden_states
    stored = ds.resid.sel(pass_="BB").isel(prompt=1).values[:, : ids.shape[1]].astype(np.float32)
    for layer in range(len(hidden) - 1):
        np.testing.assert_allclose(stored[layer], hidden[layer][0].numpy(), rtol=2e-3, atol=2e-3)
    assert ds.token_str.values[1, : ids.shape[1]].tolist() == tok.convert_ids_to_tokens(ids[0])


def test_rerun_on_complete_store_is_a_no_op(tiny_store, tiny_pair, capsys):
    before = (tiny_store / "zarr.json").stat().st_mtime_ns
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(tiny_store), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "complete   16/16" in out
    assert (tiny_store / "zarr.json").stat().st_mtime_ns == before


def test_resume_recomputes_only_missing_regions(tiny_store, tiny_pair, tmp_path):
    import shutil

    copy = tmp_path / "partial.zarr"
    shutil.copytree(tiny_store, copy)
    group = zarr.open_group(str(copy), mode="r+", use_consolidated=False)
    group["done"][2, :] = False  # as if the run died before SB was written
    group["resid"][2, :] = np.zeros(group["resid"].shape[1:], dtype=np.float16)
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(copy), "--quiet"]
    assert main(args) == 0
    assert_stores_equal(copy, tiny_store)


def test_other_settings_on_existing_store_refuse(tiny_store, tiny_pair, capsys):
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(tiny_store), "--prompt", "hello", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "already exists and was captured with other settings (prompt_texts" in err and "--overwrite" in err


def test_a_long_setting_that_differs_shows_both_sides(tiny_store, tiny_pair, capsys):
    """Six stored pass pairs against one asked for: the message cuts each side short, never the one asked for."""
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(tiny_store), "--pass-pair", "BB-SS", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pass_pairs: stored [['BB-BS'" in err and "vs now [['BB-SS', 'BB', 'SS']]" in err, err
    assert bool(open_store(tiny_store).done.all())


def test_overwrite_and_options(tiny_pair, tmp_path, capsys):
    path = tmp_path / "o.zarr"
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(path), "--quiet", "--prompt", "Why does ice",
            "--passes", "BB,SS", "--chat-template", "--add-bos", "--store-dtype", "float32", "--batch-size", "1"]
    assert main(args) == 0
    ds = open_store(path)
    assert list(ds.pass_.values) == ["BB", "SS"] and ds.resid.dtype == np.float32
    assert ds.token_str.values[0, 0] == "<|endoftext|>" and "<|assistant|>" in ds.token_str.values[0].tolist()
    assert ds.attrs["capture_settings"]["chat_template"] == "always" and ds.chat_templated.values.all()
    assert main([*args, "--overwrite", "--passes", "SS"]) == 0
    assert list(open_store(path).pass_.values) == ["SS"]


def test_lens_statistics_in_the_cli_store(tiny_store):
    ds = open_store(tiny_store)
    assert bool(ds.lens_done.all())
    assert list(ds.pair.values) == ["BB-BS", "BB-SB", "BB-SS", "BS-SB", "BS-SS", "SB-SS"]
    assert list(ds.lens.values) == ["raw", "norm"] and ds.sizes["k"] == 20
    n = int(ds.n_tokens[0])
    entropy = ds.entropy.isel(prompt=0).values
    assert np.isfinite(entropy[..., :n]).all() and np.isnan(entropy[..., n:]).all()
    # The SFT model was tuned on chat text: its norm lens differs from the base model's at the last layer.
    assert float(ds.kl.sel(pair="BB-SS", lens="norm").isel(layer=-1).mean()) > 0.01


def test_lens_options(tiny_pair, tmp_path, capsys):
    path = tmp_path / "l.zarr"
    common = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(path), "--quiet", "--prompt", "Why is it"]
    assert main([*common, "--top-k", "3", "--track", "Ġthe", "--track", "7", "--pass-pair", "BB-SS"]) == 0
    ds = open_store(path)
    assert ds.sizes["k"] == 3 and list(ds.pair.values) == ["BB-SS"]
    assert ds.tracked_str.values.tolist()[1] == "Ġthe" and ds.tracked_id.values[0] == 7
    assert main([*common, "--no-lens", "--overwrite"]) == 0
    assert "entropy" not in open_store(path) and "lens_done" not in open_store(path)
    assert main([*common, "--overwrite", "--track", "Ġthee"]) == 2
    err = capsys.readouterr().err
    assert "tracked token 'Ġthee' is not a piece of the tokenizer; closest pieces: 'Ġthe'" in err


def test_prompt_variants_and_normalize_length(tiny_pair, tmp_path, capsys):
    path = tmp_path / "v.zarr"
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(path), "--quiet", "--no-lens",
            "--prompt", "Why does ice float? It is light.", "--prompt", "Explain the moon landing.",
            "--prompt-variant", "identity", "--prompt-variant", "reverse_sentences", "--normalize-length"]
    assert main(args) == 0
    assert "normalized prompt lengths to" in capsys.readouterr().out
    ds = open_store(path)
    assert ds.prompt_index.values.tolist() == [0, 0, 1, 1]
    assert ds.variant.values.tolist() == ["identity", "reverse_sentences"] * 2
    lengths = set(ds.n_tokens.values.tolist())
    assert len(lengths) == 1 and (ds.token_id.values >= 0).all()
    assert main([*args[:-3], "--prompt-variant", "nope", "--overwrite"]) == 2
    assert "unknown prompt variant 'nope'" in capsys.readouterr().err


def test_info_and_pairs(tiny_store, capsys):
    assert main(["info", str(tiny_store)]) == 0
    out = capsys.readouterr().out
    assert "pass_=4, prompt=4, layer=5" in out and "BS=(sft LLM, base emb, sft unemb)" in out
    assert main(["pairs"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt2", "qwen1.5b", "llama3.1-8b", "minitron-8b", "tiny"):
        assert name in out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["capture", "--pair", "qwen-1.8b"], "did you mean 'qwen1.5b'"),
     (["info", "/nonexistent/store.zarr"], "no resdiff store at /nonexistent/store.zarr"),
     (["capture", "--base", "/nonexistent/base", "--sft", "/nonexistent/sft"], "no such directory"),
     (["capture", "--base", "/nonexistent/base"], "give both --base and --sft"),
     (["capture", "--passes", "BB,QQ"], "unknown pass 'QQ'")],
)
def test_errors_are_one_line_with_exit_code(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_debug_shows_traceback_in_a_real_process():
    cmd = [sys.executable, "cli.py", "--debug", "info", "/nonexistent.zarr"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("or check the path")
    help_text = subprocess.run([sys.executable, "cli.py", "capture", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    assert "--pair" in help_text and "resumes" in help_text


def test_every_help_renders_its_percent_signs(capsys):
    from cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ["", *commands]:
        with pytest.raises(SystemExit):
            main([name, "--help"] if name else ["--help"])
        text = capsys.readouterr().out
        assert "%%" not in text and "usage:" in text, name
    assert commands["info"].description  # a description beside its one-line help


def test_storage_options_last_only_for_their_command(tmp_path, capsys):
    """``--storage-option`` is in effect while its command runs (a scoped context), not for the rest of the
    process: a notebook or test that calls ``main`` twice must not inherit the first call's credentials."""
    from store.location import current_storage_options

    seen = []
    import store.reader

    real = store.reader.open_store

    def spy(*args, **kwargs):
        seen.append(current_storage_options())
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store.reader, "open_store", spy)
        assert main(["--storage-option", "anon=true", "info", str(tmp_path / "missing.zarr")]) == 2
    assert seen == [{"anon": True}]  # in effect during the command
    assert current_storage_options() == {}  # and undone after it
    assert "no resdiff store" in capsys.readouterr().err


# (command, old spelling, new spelling, a value or None for a flag); parsed alone, with the command's
# positional arguments
RENAMED = [
    (["report", "s.zarr"], "--pair", "--pass-pair", "BB-SS"),
    (["report", "s.zarr"], "--prompt", "--prompt-index", "3"),
    (["decompose", "s.zarr"], "--pair", "--pass-pair", "BB-SS"),
    (["decompose", "s.zarr"], "--top-k", "--components", "4"),
    (["decompose", "s.zarr"], "--force", "--overwrite", None),
    (["plot", "s.zarr"], "--prompt", "--prompt-index", "3"),
    (["plot", "s.zarr"], "--top-k", "--components", "4"),
    (["diff-lens", "s.zarr"], "--pair", "--pass-pair", "BB-SS"),
    (["loader-stats", "s.zarr", "--layer", "1"], "--pair", "--pass-pair", "BB-SS"),
    (["capture"], "--pairs", "--pass-pair", "BB-SS,BS-SB"),
    (["sweep"], "--pairs", "--pair", "tiny,gpt2"),
]


@pytest.mark.parametrize(("command", "old", "new", "value"), RENAMED, ids=[f"{c[0]} {o}" for c, o, _, _ in RENAMED])
def test_old_spellings_still_work_and_say_once_what_they_are_now(command, old, new, value, capsys):
    """One name per concept across the commands; a user's script with an old spelling still runs, told once."""
    from cli import build_parser

    given = [value] if value is not None else []
    renamed = build_parser().parse_args([*command, old, *given, old, *given])
    assert capsys.readouterr().err.count(f"note: {old} is now {new}") == 1
    current = build_parser().parse_args([*command, new, *given, new, *given])
    assert capsys.readouterr().err == ""
    assert vars(renamed) == vars(current)
    with pytest.raises(SystemExit):  # the help names the new spelling only
        build_parser().parse_args([command[0], "--help"])
    shown = capsys.readouterr().out
    assert new in shown and f"{old} " not in shown.replace(new, "")


def test_comma_lists_repeat():
    from cli import build_parser

    args = build_parser().parse_args(["capture", "--pass-pair", "BB-SS", "--pass-pair", "BS-SB,SB-SS"])
    assert args.pass_pairs == "BB-SS,BS-SB,SB-SS"
    args = build_parser().parse_args(["sweep", "--pair", "tiny", "--pair", "gpt2,qwen0.5b"])
    assert args.model_pairs == "tiny,gpt2,qwen0.5b"


def test_each_command_is_declared_beside_its_handler_in_its_layer():
    """cli.py holds the shared options and the error handling; each command lives in its layer's commands.py."""
    import argparse

    from cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    layers = {name: p.get_default("func").__module__ for name, p in sub.choices.items()}
    assert set(layers.values()) == {"capture.commands", "analysis.commands", "store.commands"}, layers
    assert layers["capture"] == "capture.commands" and layers["plot"] == "analysis.commands"
    assert layers["verify"] == "store.commands"
    cli_lines = (Path(__file__).resolve().parents[1] / "cli.py").read_text().splitlines()
    assert len(cli_lines) < 300, f"cli.py has {len(cli_lines)} lines; declare commands in their layer"
