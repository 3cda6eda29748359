#!/usr/bin/env python
"""Do the tests still catch the bugs they were written for? Each entry of tests/mutations.toml is a plausible bug:
an exact snippet of a file (`find`, which must occur exactly once there) and what it becomes (`replace`), with the
tests that must fail because of it (`tests`) and the guarantee they protect (`guards`).

For each entry this copies the repository's files (tracked and untracked-but-not-ignored; one copy per job, reused:
the file is restored after each mutation), applies the change there, never in the checkout, and runs
`python -m pytest -x -q -p no:cacheprovider <tests>` in the copy with the repository's .venv. Pytest's exit code
says what happened:

    caught    1: a named test failed (what we want)
    survived  0: every named test passed with the bug in place (a weak spot: strengthen a test or name another)
    error     anything else (collection error, unknown test id, timeout), with the reason

One line per entry, then a summary; exit status 1 if anything survived or errored. Too slow for CI (each entry runs
its tests, some of them whole training runs); tests/test_mutations.py checks in CI that the catalogue still applies.

    .venv/bin/python scripts/check_mutations.py --baseline       # tests pass unmutated, then every entry (~9 min)
    .venv/bin/python scripts/check_mutations.py --only infer-seed-per-video --verbose  # which test failed, and why
    .venv/bin/python scripts/check_mutations.py --list             # id, file and guarantee of each entry
    .venv/bin/python scripts/check_mutations.py --catalogue try.toml  # candidate entries, before adding them
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport
    import tomli as tomllib


ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "tests" / "mutations.toml"
FIELDS = {"id": str, "file": str, "find": str, "replace": str, "tests": list, "guards": str}
ENVIRONMENT = {"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # as scripts/test.sh


def load(path=CATALOGUE):
    """The catalogue's entries (a list of dicts); ValueError naming the entry whose fields are wrong."""
    entries = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("mutation", [])
    for number, entry in enumerate(entries, 1):
        wrong = [f"{name} ({kind.__name__})" for name, kind in FIELDS.items() if not isinstance(entry.get(name), kind)]
        unknown = sorted(set(entry) - set(FIELDS))
        if wrong or unknown or not entry["tests"] or not all(isinstance(t, str) for t in entry["tests"]):
            raise ValueError(f"{path}: [[mutation]] #{number} ({entry.get('id')}): missing or wrong: "
                             f"{', '.join(wrong) or 'tests (a non-empty list of node ids)'}; unknown: {unknown}")
    return entries


def mutated(entry, root=ROOT):
    """(original text, mutated text) of the entry's file under `root`; ValueError unless `find` occurs exactly once."""
    text = (Path(root) / entry["file"]).read_text(encoding="utf-8")
    count = text.count(entry["find"])
    if count != 1:
        raise ValueError(f"{entry['id']}: `find` occurs {count} times in {entry['file']} (must be exactly once): "
                         "the code changed; update the entry from the current code")
    return text, text.replace(entry["find"], entry["replace"])


def copy_repository(target):
    """The tracked and untracked-but-not-ignored files into `target`; the virtual environment linked, not copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() or source.is_symlink():  # a tracked file deleted in the checkout is left out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    if (ROOT / ".venv").is_dir():
        (target / ".venv").symlink_to(ROOT / ".venv")


def python():
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_pytest(copy, tests, timeout, stop_first=True):
    """(exit code, last lines of output) of pytest on `tests` in `copy`; exit code None on a timeout."""
    command = [python(), "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider", *tests]
    # No bytecode: a file restored within the same second at the same size would otherwise reuse the mutant's .pyc.
    env = {**ENVIRONMENT, **os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "250"}  # COLUMNS: whole reasons
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]  # -ra's summary: which test, why
    return result.returncode, " | ".join(failed[:1] or lines[-3:])


def check(entry, copy, timeout):
    """(verdict, seconds, detail) of one entry, its file restored afterwards."""
    start = time.monotonic()
    try:
        original, text = mutated(entry, copy)
    except (OSError, ValueError) as error:
        return "error", 0.0, str(error)
    path = copy / entry["file"]
    path.write_text(text, encoding="utf-8")
    try:
        code, detail = run_pytest(copy, entry["tests"], timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    verdict = {1: "caught", 0: "survived"}.get(code, "error")
    if verdict == "error":
        detail = f"pytest exit code {code}: {detail}"
    elif verdict == "survived":
        detail = f"every test passed with {entry['file']}: {entry['find'].strip()!r} -> {entry['replace'].strip()!r}"
    return verdict, time.monotonic() - start, detail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="check these entries only")
    parser.add_argument("--catalogue", type=Path, default=CATALOGUE, help="another catalogue (to try new entries)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--verbose", action="store_true", help="also say which test failed, and why, for caught ones")
    parser.add_argument("--jobs", type=int, default=1, help="entries checked at once, each in its own copy (default 1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per entry before it counts as an error")
    parser.add_argument("--baseline", action="store_true",
                        help="first run every selected entry's tests unmutated (they must pass, else 'caught' means "
                             "nothing)")
    args = parser.parse_args(argv)
    entries = load(args.catalogue)
    if args.only:
        unknown = sorted(set(args.only) - {e["id"] for e in entries})
        if unknown:
            parser.error(f"no entry with id {', '.join(unknown)} in {args.catalogue}")
        entries = [e for e in entries if e["id"] in args.only]
    if args.list:
        for entry in entries:
            print(f"{entry['id']:34} {entry['file']:34} {entry['guards']}")
        return 0
    start, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory(prefix="mutations-") as scratch:
        copies = [Path(scratch) / f"copy-{n}" for n in range(max(1, args.jobs))]
        for copy in copies:
            copy_repository(copy)
        if args.baseline:
            tests = list(dict.fromkeys(t for e in entries for t in e["tests"]))
            code, detail = run_pytest(copies[0], tests, args.timeout * len(entries), stop_first=False)
            print(f"baseline ({len(tests)} tests, unmutated): {'passed' if code == 0 else 'FAILED: ' + detail}")
            if code != 0:
                return 1
        free = list(copies)  # one copy per worker thread: each takes one and gives it back

        def run(entry):
            copy = free.pop()
            try:
                verdict, seconds, detail = check(entry, copy, args.timeout)
            finally:
                free.append(copy)
            results[entry["id"]] = verdict
            shown = f"  {detail}" if verdict != "caught" else (f"  {detail[:200]}" if args.verbose else "")
            print(f"{verdict:9} {entry['id']:34} {seconds:6.0f} s{shown}", flush=True)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            list(pool.map(run, entries))
    counts = {v: sum(r == v for r in results.values()) for v in ("caught", "survived", "error")}
    print(f"{counts['caught']} caught of {len(results)}; {counts['survived']} survived, {counts['error']} error(s); "
          f"{time.monotonic() - start:.0f} s")
    return 0 if counts["caught"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
