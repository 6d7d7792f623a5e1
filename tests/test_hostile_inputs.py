"""The new paths attacked as a hostile user would (issue 22): each case ends in one line
naming the culprit, a documented exit code, no traceback, and nothing of the user's
overwritten. No model loads here (the adapter checks read only the tiny base's
safetensors header); the cases that need one are in test_evaluate.py and test_fuse.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading

import mlx.core as mx
import pytest

from mlx_tune.checkpoint.rundir import RunDirError, RunLock
from mlx_tune.cli import main
from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from mlx_tune.files import WriteRefused, atomic_write, check_new_dir

NOTES = "my notes, not a report\n"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "traceback in" not in err, err
    return err


# ------------------------------------------------------------------ numbers and configs

@pytest.mark.parametrize("flags,key", [
    (["--num-epochs", "nan"], "num_epochs"),
    (["--num-epochs", "inf"], "num_epochs"),
    (["--num-epochs", "1e300"], "num_epochs"),
    (["--learning-rate", "inf"], "learning_rate"),
    (["--betas", "[0.9, .nan]"], "betas"),
    (["--lora-alpha=-inf"], "lora.alpha"),
])
def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flags, key):
    out = tmp_path / "run"
    argv = ["train", "--model", "m", "--data", str(tmp_path), "--output-dir", str(out), *flags]
    assert main(argv) == EXIT_USAGE
    assert f"'{key}'" in one_line(capsys)
    assert not out.exists()  # no spec.yaml written before the refusal


def test_non_finite_numbers_in_yaml_name_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: m\nwarmup_ratio: .nan\n")
    with pytest.raises(SpecError, match=rf"^{path}:2: 'warmup_ratio' is nan; expected a finite"):
        build_spec(path)


@pytest.mark.parametrize("body,culprit", [
    ("lora_parameters: {rank: eight, scale: 2.0}", "rank is 'eight'; expected an integer"),
    ("lora_parameters: {rank: 8, scale: big}", "scale is 'big'; expected a number"),
    ("lora_parameters: {rank: 8, keys: [[q]]}", "'lora_parameters' has a value of the wrong type"),
    ("optimizer_config: {adam: [1, 2]}", "'optimizer_config' has a value of the wrong type"),
    ("lr_schedule: {name: cosine_decay, arguments: 5}", "'lr_schedule' has a value of the wrong"),
    ("lr_schedule: {name: cosine_decay, warmup: soon}", "'lr_schedule' has a value of the wrong"),
    ("lr_schedule: {name: [cosine_decay]}", "'lr_schedule' has a value of the wrong type"),
    ("iters: many", "'max_steps' is 'many'; expected an integer"),
])
def test_mlx_lm_config_values_of_the_wrong_type_name_file_line_and_key(tmp_path, body, culprit):
    path = tmp_path / "lora_config.yaml"
    path.write_text(f"model: m\ndata: d\nsteps_per_report: 5\n{body}\n")
    with pytest.raises(SpecError) as e:
        build_spec(path, log=lambda m: None)
    assert str(e.value).startswith(f"{path}:4: ") and culprit in str(e.value)


def test_mlx_lm_scale_written_as_yaml_text_still_reads(tmp_path):
    path = tmp_path / "lora_config.yaml"  # YAML 1.1 reads 1e1 as text; mlx-lm takes it
    path.write_text("model: m\niters: 5\nlora_parameters: {rank: 4, scale: 1e1}\n")
    assert build_spec(path, log=lambda m: None).lora.alpha == 40.0


# ------------------------------------------------------------------ links and our files

def test_run_lock_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(NOTES)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".mlx-tune.lock").symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert victim.read_text() == NOTES
    (run / ".mlx-tune.lock").unlink()
    (run / ".mlx-tune.lock").symlink_to(tmp_path / "elsewhere" / "made-by-the-lock")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert not (tmp_path / "elsewhere").exists()
    (run / ".mlx-tune.lock").unlink()
    os.mkfifo(run / ".mlx-tune.lock")
    with pytest.raises(RunDirError, match="not a regular file"):
        RunLock(run).acquire()


def test_atomic_write_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(NOTES)
    target = tmp_path / "out.json"
    tmp = tmp_path / f".out.json.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.symlink_to(victim)
    atomic_write(target, "{}")
    assert victim.read_text() == NOTES and target.read_text() == "{}"
    assert not tmp.exists() and not tmp.is_symlink()


def test_a_new_directory_is_only_new_or_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_new_dir(tmp_path / "empty", "x") == tmp_path / "empty"
    assert check_new_dir(tmp_path / "absent", "x") == tmp_path / "absent"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text(NOTES)
    with pytest.raises(WriteRefused, match="not empty"):
        check_new_dir(tmp_path / "full", "x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(WriteRefused, match="symbolic link"):
        check_new_dir(tmp_path / "link", "x")


# ------------------------------------------------------------------ report

def write_metrics(run, records):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def night(steps=4):
    """Records as the reporters write them: a start, train reports, an eval, a stop."""
    out = [{"type": "start", "step": 0, "wall_time": 1000.0, "info": {"total_steps": steps}}]
    for s in range(1, steps + 1):
        out.append({"type": "train", "step": s, "loss": 3.0 - s / 10, "learning_rate": 1e-4,
                    "grad_norm": 1.0, "tokens_per_second": 500.0, "trained_tokens": 100 * s,
                    "total_steps": steps, "wall_time": 1000.0 + s})
    out.append({"type": "eval", "step": steps, "val_loss": 2.5, "wall_time": 1000.0 + steps})
    out.append({"type": "stop", "step": steps, "reason": f"finished {steps} steps",
                "exit_code": 0, "wall_time": 1010.0})
    return out


def test_report_html_replaces_only_a_report(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, night())
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    assert main(["report", str(run), "--html", str(notes)]) == EXIT_USAGE
    assert f"{notes}: exists and was not written by mlx-tune report" in one_line(capsys)
    assert notes.read_text() == NOTES
    page = tmp_path / "page.html"
    assert main(["report", str(run), "--html", str(page)]) == EXIT_OK
    assert main(["report", str(run), "--html", str(page)]) == EXIT_OK  # ours: replaced
    capsys.readouterr()
    link = tmp_path / "link.html"
    link.symlink_to(notes)
    assert main(["report", str(run), "--html", str(link), "--force"]) == EXIT_USAGE
    assert "symbolic link" in one_line(capsys) and notes.read_text() == NOTES
    assert main(["report", str(run), "--html", str(notes), "--force"]) == EXIT_OK
    assert notes.read_text().startswith("<!doctype html>")


def test_report_skips_damaged_records_and_names_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    records = night()
    records[2]["step"] = "two"
    records[3]["wall_time"] = [1]
    write_metrics(run, records)
    assert main(["report", str(run), "--html", str(tmp_path / "r.html")]) == EXIT_OK
    page = (tmp_path / "r.html").read_text()  # the terminal table wraps long lines
    assert "2 damaged record(s) skipped, the first" in page
    assert "metrics.jsonl:3: &#x27;step&#x27; is &#x27;two&#x27;; expected an integer" in page


def test_report_of_only_damaged_records_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, [{"type": "train", "step": None, "loss": "low"}, {"type": ["train"]}])
    assert main(["report", str(run)]) == EXIT_ERROR
    assert "metrics.jsonl: holds no usable training records (" in one_line(capsys)


def test_report_survives_randomly_damaged_metrics(tmp_path, capsys):
    """Fault injection: wrong types, nulls, huge and non-finite numbers in random fields
    of real-shaped records; every report ends in 0 or one line with exit 1."""
    rng = random.Random(22)
    bad = ["x", [1], {"a": 1}, True, None, 1e308, -5, 10 ** 30]
    for trial in range(10):
        run = tmp_path / f"run{trial}"
        records = night()
        for r in records:
            if rng.random() < 0.3:
                key = rng.choice(sorted(r) + ["info", "early_stopping"])
                r[key] = rng.choice(bad)
        write_metrics(run, records)
        (run / "metrics.jsonl").open("a").write('{"type": "train", "step": 9, "lo')  # torn
        code = main(["report", str(run), "--html", str(run / "r.html")])
        err = capsys.readouterr().err
        assert code in (EXIT_OK, EXIT_ERROR) and "Traceback" not in err
        assert "traceback in" not in err, (trial, err)


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run without the power to write where permissions forbid it: as root,
    without CAP_DAC_OVERRIDE (setpriv), so a read-only directory is read-only."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]


def read_only(path):
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


@pytest.mark.slow
def test_report_of_a_read_only_run_directory(tmp_path, subprocess_env):
    run = tmp_path / "run"
    write_metrics(run, night())
    read_only(run)
    try:
        page = tmp_path / "page.html"
        cmd = unprivileged([sys.executable, "-m", "mlx_tune", "report", str(run), "--html",
                            str(page)])
        done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == EXIT_OK, done.stderr
        assert page.read_text().count("data:image/png;base64,") >= 1
        done = subprocess.run(cmd[:-2], env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
        err = done.stderr.strip().splitlines()[-1]
        assert done.returncode == EXIT_ERROR and "report.html: cannot write the report" in err
        assert "Traceback" not in done.stderr
    finally:
        run.chmod(0o755)


# ------------------------------------------------------------------ adapters

def base_dims(tiny_model):
    from mlx_tune.export.fit import base_shapes
    return base_shapes(tiny_model)


def mlx_adapter(tiny_model, path, modules=("self_attn.q_proj", "self_attn.v_proj"), rank=4):
    """An mlx-lm adapter for the tiny base's last two blocks, shaped from its header."""
    shapes = base_dims(tiny_model)
    weights = {}
    for layer in (2, 3):
        for module in modules:
            name = f"model.layers.{layer}.{module}"
            out, inp = shapes.get(f"{name}.weight", (64, 256))
            weights[f"{name}.lora_a"] = mx.random.normal((inp, rank))
            weights[f"{name}.lora_b"] = mx.random.normal((rank, out))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "model": str(tiny_model),
        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0,
                            "keys": sorted(modules)}}))
    return path


def peft_adapter(tiny_model, tmp_path):
    src = mlx_adapter(tiny_model, tmp_path / "mlx-src")
    assert main(["convert-adapter", "--to", "peft", str(src), str(tmp_path / "peft")]) == 0
    return tmp_path / "peft"


def convert(capsys, to, src, dst):
    code = main(["convert-adapter", "--to", to, str(src), str(dst)])
    return code, capsys.readouterr().err


def test_convert_adapter_never_writes_into_another_adapter(tiny_model, tmp_path, capsys):
    src = mlx_adapter(tiny_model, tmp_path / "a")
    other = peft_adapter(tiny_model, tmp_path)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    code, err = convert(capsys, "peft", src, other)
    assert code == EXIT_USAGE and "exists and is not empty" in err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    (tmp_path / "empty").mkdir()
    code, _ = convert(capsys, "peft", src, tmp_path / "empty")
    assert code == EXIT_OK and (tmp_path / "empty" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))  # the temporary directory is gone


def damage_truncate(path):
    os.truncate(path, os.path.getsize(path) - 100)


@pytest.mark.parametrize("fmt", ["mlx", "peft"])
@pytest.mark.parametrize("damage,culprit", [
    (lambda d, w, c: damage_truncate(d / w), "{w}: not a readable safetensors file"),
    (lambda d, w, c: (d / w).write_bytes(b"\x00" * 3), "{w}: not a readable safetensors file"),
    (lambda d, w, c: (d / c).write_text((d / c).read_text()[:40]), "{c}:"),
    (lambda d, w, c: (d / c).write_text("[1, 2]"), "{c}: expected a JSON object"),
])
def test_corrupt_adapter_files_are_named(tiny_model, tmp_path, capsys, fmt, damage, culprit):
    src = mlx_adapter(tiny_model, tmp_path / "a") if fmt == "mlx" else peft_adapter(tiny_model, tmp_path)
    capsys.readouterr()
    weights = "adapters.safetensors" if fmt == "mlx" else "adapter_model.safetensors"
    damage(src, weights, "adapter_config.json")
    code, err = convert(capsys, "peft" if fmt == "mlx" else "mlx", src, tmp_path / "out")
    assert code == EXIT_ERROR and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(src / culprit.format(w=weights, c="adapter_config.json")) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,key,value,culprit", [
    ("mlx", "lora_parameters", {"rank": 4, "scale": "two"}, "key 'scale' is 'two'"),
    ("mlx", "lora_parameters", {"rank": [4], "scale": 2.0}, "key 'rank' is [4]"),
    ("mlx", "model", 7, "key 'model' is 7"),
    ("peft", "r", "four", "key 'r' is 'four'; expected an integer"),
    ("peft", "lora_alpha", None, "key 'lora_alpha' missing"),
    ("peft", "lora_dropout", "none", "key 'lora_dropout' is 'none'"),
])
def test_adapter_config_values_of_the_wrong_type_name_the_key(tiny_model, tmp_path, capsys,
                                                              fmt, key, value, culprit):
    src = mlx_adapter(tiny_model, tmp_path / "a") if fmt == "mlx" else peft_adapter(tiny_model, tmp_path)
    capsys.readouterr()
    config = json.loads((src / "adapter_config.json").read_text())
    config[key] = value
    (src / "adapter_config.json").write_text(json.dumps(config))
    code, err = convert(capsys, "peft" if fmt == "mlx" else "mlx", src, tmp_path / "out")
    assert code == EXIT_ERROR and f"{src / 'adapter_config.json'}" in err and culprit in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("to", ["peft", "mlx"])
def test_an_adapter_for_modules_the_base_lacks_is_refused(tiny_model, tmp_path, capsys, to):
    src = mlx_adapter(tiny_model, tmp_path / "a", modules=("self_attn.qkv_proj",))
    if to == "mlx":  # the same adapter in peft's format, converted without the check
        from mlx_tune.export.adapters import read_adapter, save_peft
        save_peft(read_adapter(src), tmp_path / "p")
        src = tmp_path / "p"
    code, err = convert(capsys, to, src, tmp_path / "out")
    assert code == EXIT_ERROR and "model.layers.2.self_attn.qkv_proj, which the base" in err
    assert not (tmp_path / "out").exists()
    wide = mlx_adapter(tiny_model, tmp_path / "w")
    weights = mx.load(str(wide / "adapters.safetensors"))
    weights["model.layers.3.self_attn.v_proj.lora_b"] = mx.zeros((4, 999))
    mx.save_safetensors(str(wide / "adapters.safetensors"), weights)
    code, err = convert(capsys, "peft", wide, tmp_path / "out2")
    assert code == EXIT_ERROR and "model.layers.3.self_attn.v_proj is [999, 256] in the adapter" in err


def test_generate_tools_with_a_template_that_drops_them_is_refused(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "d", "parameters": {"type": "object"}}}]))
    code = main(["generate", "--model", str(model), "--prompt", "hi", "--tools", str(tools),
                 "--backend", "mlx"])
    err = one_line(capsys)
    assert code == EXIT_ERROR and err.startswith(f"mlx-tune: error: --tools {tools}: tools")
    assert "drops tool definitions" in err
