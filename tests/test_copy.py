"""The modules people copy work where they are pasted: vendored into a package of another
project (imports made relative), away from this repository, with no `__main__` of ours."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def project_imports(module: str) -> set[str]:
    """The project modules `module` imports (at any depth of its code)."""
    with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in PROJECT:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name in PROJECT}
    return names


def closure(module: str) -> list[str]:
    """`module` and every project module it needs, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(project_imports(m))
    return sorted(seen)


def vendor(modules: list[str], into) -> int:
    """Copy `modules` into the package `into` (a folder), their project imports made relative,
    as a project vendoring them would. Returns the lines copied."""
    into.mkdir()
    (into / "__init__.py").write_text("")
    lines = 0
    for m in modules:
        with open(os.path.join(ROOT, m + ".py"), encoding="utf-8") as f:
            text = f.read()
        text = re.sub(rf"^(\s*)from ({'|'.join(modules)}) import", r"\1from .\2 import", text,
                      flags=re.M)  # fmt: skip
        (into / f"{m}.py").write_text(text)
        lines += text.count("\n")
    return lines


def run_outside(code: str, cwd) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter in `cwd`, without our PYTHONPATH: the vendored copies are
    reached by their relative imports, and `__file__` says which copy ran."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_reward_vendored_into_a_package_grades_with_math_verify(tmp_path):
    """`\\sqrt{4}` vs `2` is beyond the fast path: only math-verify's worker process decides
    it, and that worker must start from a vendored copy too (no path of ours, no `__main__`)."""
    assert closure("reward") == ["octopus", "reward"]
    vendor(closure("reward"), tmp_path / "thirdparty")
    code = (
        "from thirdparty import reward\n"
        "print(reward.is_equivalent(r'\\sqrt{4}', '2'), reward.is_equivalent(r'\\sqrt{5}', '2'),"
        " reward.grader_stats()['graded'], reward.__file__)\n"
    )
    proc = run_outside(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    equal, unequal, graded, where = proc.stdout.split()
    assert (equal, unequal, graded) == ("True", "False", "2")  # both went to math-verify
    assert where == str(tmp_path / "thirdparty" / "reward.py")


@pytest.mark.slow
def test_augment_vendored_runs_the_readme_worked_example(tmp_path, tiny_path):
    """augment.py with what it needs is small enough to copy (at most 1,200 lines), and the
    README's worked example, run from such a copy, prints what the README shows."""
    modules = closure("augment")
    assert modules == ["augment", "octopus", "reward"]
    assert vendor(modules, tmp_path / "lib") <= 1200
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```(\w*)\n(.*?)^```$", f.read(), flags=re.S | re.M)
    k = next(
        i for i, (lang, code) in enumerate(blocks) if lang == "python" and "splice_group" in code
    )
    code, shown = blocks[k][1], blocks[k + 1][1]
    for m in modules:
        code = code.replace(f"from {m} import", f"from lib.{m} import")
    # the tokenizer of the tiny model, from the test run's checkpoint (tiny.py stays here)
    code = code.replace("from tiny import build_tiny\n", "")
    code = code.replace("build_tiny()", repr(tiny_path))
    assert "from lib.augment import" in code and "build_tiny" not in code
    # loss.py (torch only) gives the advantages; it is copied on its own, so it comes along too
    vendor(["loss"], tmp_path / "losslib")
    code = code.replace("from loss import", "from losslib.loss import")
    proc = run_outside(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == shown.strip()
