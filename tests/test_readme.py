"""Every command in README.md and bench/README.md runs as written, so neither can drift from the
code.

CPU commands run for real on the tiny model with small sizes: a demo checkpoint the README
names (`runs/demo/stage-*/export`) becomes the tiny checkpoint, and each script gets the flags
of `SMALL` appended (argparse keeps the last value). train.py's runs (their stages are tested
in test_train.py) and the test command (this suite) are checked with `--dry_run` / not at all.
Blocks whose first line starts with `# GPU` are parsed only: train.py's `--dry_run`, eval.py's
and coldstart.py's argument parsers. Blocks whose first line starts with `# Download` need the
network: they are checked with `bash -n` only. Python blocks run and must print the text block
after them.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "eval.py": ["--limit", "4", "--max_tokens", "16", "--kv_cache_gb", "0.1"],
    "bench/step_time.py": ["--reps", "1", "--prompts", "2"],
    "bench/signal_density.py": ["--prompts", "4", "--n", "2"],
    "bench/update_throughput.py": ["--models", "tiny", "--shapes", "demo", "--reps", "1"],
    "bench/reward_throughput.py": ["--responses", "200", "--degenerate_chars", "1000"],
    "bench/augment_overhead.py": ["--prompts", "4", "--tokens", "64"],
    "bench/memory_plan.py": [],
    "bench/data_scale.py": ["--rows", "8", "16", "--modes", "encoded"],
    # parsed only: test_toy_replication.py runs the smoke of every arm (a superset of this run)
    "bench/toy_replication.py": ["--help"],
    "bench/peer_trl.py": ["--help"],  # needs TRL (a bench-only extra); parsed only
}
DEMO_EXPORT = re.compile(r"^runs/demo/stage-[a-z0-9]+/export$")


def readme_blocks() -> list[tuple[str, str]]:
    blocks = []
    for name in ("README.md", "bench/README.md"):  # the reference, then the measured results
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            blocks += re.findall(r"^```(\w*)\n(.*?)^```$", f.read(), flags=re.S | re.M)
    return blocks


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def is_gpu(block: str) -> bool:
    return block.lstrip().startswith("# GPU")


def is_download(block: str) -> bool:
    return block.lstrip().startswith("# Download")


BASH = [(b, is_gpu(b)) for lang, b in readme_blocks() if lang == "bash" and not is_download(b)]
DOWNLOADS = [b for lang, b in readme_blocks() if lang == "bash" and is_download(b)]
CPU_COMMANDS = [c for b, gpu in BASH if not gpu for c in commands(b)]
GPU_COMMANDS = [c for b, gpu in BASH if gpu for c in commands(b)]


def test_the_readme_has_commands_of_both_kinds():
    assert len(CPU_COMMANDS) >= 5 and len(GPU_COMMANDS) >= 5
    assert all(c.startswith((".venv/bin/", "bash", "OMP_NUM_THREADS", "python3 -m venv"))
               for c in CPU_COMMANDS + GPU_COMMANDS)  # fmt: skip
    # one way to call the venv's tools: never a bare `python` / `torchrun`
    assert not [c for c in CPU_COMMANDS + GPU_COMMANDS if re.match(r"^(python|torchrun|pip) ", c)]


def script_and_args(command: str) -> tuple[list[str], str, list[str]]:
    """(launcher argv, script, script args) of `.venv/bin/python|torchrun ... script.py args`."""
    words = shlex.split(command)
    while "=" in words[0] and not words[0].startswith("."):  # VAR=value prefixes
        words = words[1:]
    k = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[:k], words[k], words[k + 1 :]


@pytest.mark.parametrize("block", DOWNLOADS)
def test_download_blocks_parse(block):
    proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_downloads_write_the_paths_the_flags_default_to():
    """The bare `train.py` and `eval.py --table2` read what the README's downloads write."""
    if not DOWNLOADS:
        pytest.skip("the README has no # Download block")
    import eval as evaluate
    from config import Config

    written = "\n".join(DOWNLOADS)
    for path in (Config().train_data, Config().val_data, evaluate.parse_args(
            ["--model", "m", "--table2"]).bench_dir):  # fmt: skip
        assert path in written, path
    coldstart = [
        c for c in GPU_COMMANDS if "coldstart.py" in c and "--out " + Config().sft_data in c
    ]
    assert coldstart, Config().sft_data


@pytest.mark.parametrize("command", GPU_COMMANDS)
def test_gpu_commands_parse(command, monkeypatch):
    if command.startswith(("python3 -m venv", ".venv/bin/pip")):
        pytest.skip("installation")
    launcher, script, args = script_and_args(command)
    if script.startswith("-m") or "pytest" in launcher:
        assert os.path.exists(os.path.join(ROOT, args[-1] if args else script))
        return
    nproc = [w.split("=")[1] for w in launcher if w.startswith("--nproc_per_node=")]
    monkeypatch.setenv("WORLD_SIZE", nproc[0] if nproc else "1")
    if script == "train.py":
        import train

        train.main([*args, "--dry_run"])
    elif script == "eval.py":
        import eval as evaluate

        evaluate.parse_args(args)
    elif script == "coldstart.py":
        import coldstart

        coldstart.parse_args(args)
    else:
        raise AssertionError(f"no parse check for {script}")


def small_run(command: str) -> tuple[str, ...]:
    """What a CPU command runs here once `SMALL` is appended (the model and --out as named)."""
    _, script, args = script_and_args(command)
    flags: dict[str, tuple[str, ...]] = {"": ()}  # argparse keeps the last value of a flag
    flag = ""  # positional arguments
    for word in [*args, *SMALL.get(script, [])]:
        if word.startswith("--"):
            flag, flags[word] = word, ()
        else:
            flags[flag] = (*flags[flag], word)
    return (script, *sorted(flags.items()))


def repeats_an_earlier_run(command: str) -> bool:
    """Two commands that differ only in flags `SMALL` overrides (bench/README's two
    update_throughput rows) would run the same thing twice: the later one is parsed only."""
    earlier = CPU_COMMANDS[: CPU_COMMANDS.index(command)]
    runs = [small_run(c) for c in earlier if ".py" in c]
    return ".py" in command and small_run(command) in runs


@pytest.mark.slow
@pytest.mark.parametrize("command", CPU_COMMANDS)
def test_cpu_commands_run(command, tiny_path, tmp_path, monkeypatch, capsys):
    if ".ci/cpu-env" in command or "pytest" in command:
        pytest.skip("installation / this test suite")
    launcher, script, args = script_and_args(command)
    if script == "train.py":  # its runs are test_train.py's: here resolved and checked in process
        nproc = [w.split("=")[1] for w in launcher if w.startswith("--nproc_per_node=")]
        monkeypatch.setenv("WORLD_SIZE", nproc[0] if nproc else "1")
        import train
        from config import parse_args, stage_configs

        train.main([*args, "--dry_run"])  # nothing loads, nothing runs
        name, overrides, _ = parse_args(args)
        stages = stage_configs(name, overrides)
        assert len(capsys.readouterr().out.splitlines()) == len(stages)
        return
    if repeats_an_earlier_run(command):  # its own flags must still parse
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--help"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-2000:])
        return
    args = [tiny_path if DEMO_EXPORT.match(a) else a for a in args]
    args = [
        str(tmp_path / "out") if i and args[i - 1] == "--out" else a for i, a in enumerate(args)
    ]
    args += SMALL[script]
    if launcher[0].endswith("torchrun"):
        # --standalone: a free port, so two test sessions on one machine never meet
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher[1:]]
    else:
        launcher = [sys.executable, *launcher[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               OCTOPUS_CACHE=str(tmp_path / "cache"))  # fmt: skip
    proc = subprocess.run([*launcher, os.path.join(ROOT, script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-4000:])


@pytest.mark.slow
def test_python_blocks_print_what_the_readme_shows(tmp_path):
    blocks = readme_blocks()
    ran = 0
    for k, (lang, code) in enumerate(blocks):
        if lang != "python":
            continue
        shown = blocks[k + 1][1] if k + 1 < len(blocks) and blocks[k + 1][0] == "text" else None
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OCTOPUS_CACHE=str(tmp_path))
        proc = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        if shown is not None:
            assert proc.stdout.strip() == shown.strip()
        ran += 1
    assert ran >= 1


SCRIPTS = ["train.py", "eval.py", "coldstart.py", "tiny.py"] + sorted(
    os.path.join("bench", f) for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py")
)


# One Python process asks every script for --help in turn (each in its own empty folder):
# one import of torch instead of one per script.
HELP_ALL = """
import contextlib, io, json, os, runpy, sys
results = {}
for script, cwd in json.loads(sys.argv[1]):
    os.chdir(cwd)
    sys.argv, out, code = [script, "--help"], io.StringIO(), "returned without exiting"
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except Exception as e:  # named in this script's own result, the others still run
        code = repr(e)
    results[script] = dict(code=code, stdout=out.getvalue(), files=sorted(os.listdir(cwd)))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict:
    folders = [(os.path.join(ROOT, s), str(tmp_path_factory.mktemp("help"))) for s in SCRIPTS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, json.dumps(folders)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_that_does_no_work(script, helps):
    got = helps[os.path.join(ROOT, script)]
    assert got["code"] in (0, None) and "usage:" in got["stdout"], got
    assert got["files"] == []  # nothing written
