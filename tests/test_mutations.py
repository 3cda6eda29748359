"""The mutation catalogue (tests/mutations.toml, run by hand with scripts/check_mutations.py) does not rot: it parses,
every entry still applies to today's code (its `find` occurs exactly once in its file), and every test it names
exists. Whether the tests catch each mutation is scripts/check_mutations.py's job (too slow for CI)."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT


def _checker():
    spec = importlib.util.spec_from_file_location("check_mutations", ROOT / "scripts" / "check_mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_mutations = _checker()
ENTRIES = check_mutations.load()


def test_the_catalogue_has_unique_ids_and_covers_many_guarantees():
    ids = [entry["id"] for entry in ENTRIES]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    assert all(entry["guards"].strip() and "\n" not in entry["guards"] for entry in ENTRIES)
    assert all(entry["find"] != entry["replace"] for entry in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry["id"] for entry in ENTRIES])
def test_each_mutation_applies_to_the_code_today(entry):
    """Exactly one occurrence (the script refuses otherwise): after a refactor, rewrite the entry from the new code."""
    assert not entry["file"].startswith("tests/") and (ROOT / entry["file"]).is_file(), entry["file"]
    original, mutated = check_mutations.mutated(entry)
    assert mutated != original


def test_every_named_test_exists():
    """One `pytest --collect-only` over the files named: a node id without [...] names a test (all its
    parametrizations), one with [...] that parametrization exactly."""
    named = sorted({test for entry in ENTRIES for test in entry["tests"]})
    files = sorted({test.split("::")[0] for test in named})
    assert all((ROOT / file).is_file() for file in files), files
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = {line for line in result.stdout.splitlines() if "::" in line}
    missing = [test for test in named
               if test not in collected and ("[" in test or not any(c.startswith(test + "[") for c in collected))]
    assert not missing, missing
