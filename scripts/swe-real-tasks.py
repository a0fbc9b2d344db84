#!/usr/bin/env python3
"""Builds three SWE-bench-format tasks from real open-source Python projects' sdists.

Usage: scripts/swe-real-tasks.py OUT_DIR [--sdists DIR]

For each project the sdist (which ships the project's own tests) is downloaded with pip from
pip's default index, unless DIR already holds it, and its sha256 is checked against the pin
below. From it the script builds, in OUT_DIR:

- repos/NAME.git: a bare git repository whose one commit (fixed author and date) is the
  release with a real bug reintroduced and the tests that catch it taken out;
- tasks.jsonl: one row per task in SWE-bench's published shape: `problem_statement`, `patch`
  (the gold fix), `test_patch` (the tests that were taken out), `FAIL_TO_PASS` and
  `PASS_TO_PASS` as JSON-encoded strings, `environment_setup_commit`, `version`, plus
  rollbox's `environment_setup` (a venv with the project's real dependencies and pytest,
  installed by pip) and `test_command`;
- breaking/INSTANCE.patch: a patch that fixes the bug but breaks a PASS_TO_PASS test, for the
  tests that check such a patch scores 0.

Runs with any Python 3.8+ and git; the network is needed only for the download.
"""

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The fixed identity and date of every built commit, so the same sdist gives the same commit id.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "rollbox examples",
    "GIT_AUTHOR_EMAIL": "examples@rollbox.invalid",
    "GIT_AUTHOR_DATE": "1767225600 +0000",
    "GIT_COMMITTER_NAME": "rollbox examples",
    "GIT_COMMITTER_EMAIL": "examples@rollbox.invalid",
    "GIT_COMMITTER_DATE": "1767225600 +0000",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}

PYTEST = "pytest==8.3.4"
VENV = 'python3 -m venv "$ROLLBOX_SWE_ENV"'


def inflection_ordinal_ids(test_source):
    """Every `test_ordinal`/`test_ordinalize` id of inflection's ORDINAL_NUMBERS table, split
    into those the teen bug breaks (11th-13th, 111th-113th) and the rest."""
    tree = ast.parse(test_source)
    table = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ORDINAL_NUMBERS"
    )
    broken, kept = [], []
    for number, ordinalized in ast.literal_eval(table):
        for test in ("test_ordinal", "test_ordinalize"):
            test_id = f"test_inflection.py::{test}[{number}-{ordinalized}]"
            (broken if abs(int(number)) % 100 in (11, 12, 13) else kept).append(test_id)
    return broken, kept


TASKS = [
    {
        "instance_id": "inflection__inflection-ordinal-teens",
        "repo_name": "inflection",
        "package": "inflection",
        "version": "0.5.1",
        "sha256": "1a29730d366e996aaacffb2f1f1cb9593dc38e2ddd30c91250c6dde09ea9b417",
        "problem_statement": (
            "`inflection.ordinal` gives the wrong suffix for 11, 12 and 13: `ordinalize(11)` is "
            "'11st', `ordinalize(112)` is '112nd' and `ordinalize(-13)` is '-13rd'; they should be "
            "'11th', '112th' and '-13th'. Fix `inflection/__init__.py`."
        ),
        "source": "inflection/__init__.py",
        # The release's code, and the bug reintroduced in its place.
        "fixed": '    if number % 100 in (11, 12, 13):\n        return "th"\n    else:\n        return {\n'
        '            1: "st",\n            2: "nd",\n            3: "rd",\n        }.get(number % 10, "th")\n',
        "buggy": '    return {\n        1: "st",\n        2: "nd",\n        3: "rd",\n    }.get(number % 10, "th")\n',
        # Fixes the bug but gets "2nd" wrong: breaks PASS_TO_PASS ids.
        "breaking": '    if number % 100 in (11, 12, 13):\n        return "th"\n    else:\n        return {\n'
        '            1: "st",\n            2: "d",\n            3: "rd",\n        }.get(number % 10, "th")\n',
        "test_file": "test_inflection.py",
        "tests_taken_out": '@pytest.mark.parametrize(("number", "ordinalized"), ORDINAL_NUMBERS)\n'
        "def test_ordinal(number, ordinalized):\n"
        "    assert ordinalized == number + inflection.ordinal(number)\n\n\n"
        '@pytest.mark.parametrize(("number", "ordinalized"), ORDINAL_NUMBERS)\n'
        "def test_ordinalize(number, ordinalized):\n"
        "    assert ordinalized == inflection.ordinalize(number)\n\n\n",
        "ids": lambda tests: inflection_ordinal_ids(tests),
        "other_pass_to_pass": [
            "test_inflection.py::test_pluralize_empty_string",
            "test_inflection.py::test_camelize_with_underscores",
            "test_inflection.py::test_uncountable_word_is_not_greedy",
        ],
        "test_command": "python3 -m pytest -rA -p no:cacheprovider test_inflection.py",
        "environment_setup": [VENV, f'"$ROLLBOX_SWE_ENV/bin/pip" install --quiet {PYTEST}'],
    },
    {
        "instance_id": "tkem__cachetools-typedkey-kwargs",
        "repo_name": "cachetools",
        "package": "cachetools",
        "version": "5.5.0",
        "sha256": "2cc24fb4cbe39633fb7badd9db9ca6295d766d9c2995f245725a46715d050f2a",
        "problem_statement": (
            "`cachetools.keys.typedkey` ignores the types of keyword arguments: "
            "`typedkey(x=1) == typedkey(x=1.0)`, so `@cached(cache, key=typedkey)` returns the "
            "result computed for `f(x=1)` when called as `f(x=1.0)`. Keyword arguments' types "
            "must be part of the key, as positional arguments' are. Fix `src/cachetools/keys.py`."
        ),
        "source": "src/cachetools/keys.py",
        "fixed": "    key += tuple(type(v) for v in args)\n    key += tuple(type(v) for _, v in sorted(kwargs.items()))\n",
        "buggy": "    key += tuple(type(v) for v in args)\n",
        # Types the keyword arguments but no longer the positional ones.
        "breaking": "    key += tuple(type(v) for _, v in sorted(kwargs.items()))\n",
        "test_file": "tests/test_keys.py",
        "tests_added_after": "        self.assertNotEqual(key(1, 2, 3), key(1.0, 2.0, 3.0))\n\n",
        "tests_added": "    def test_typedkey_kwargs(self, key=cachetools.keys.typedkey):\n"
        "        self.assertEqual(key(x=1), key(x=1))\n"
        "        self.assertNotEqual(key(x=1), key(x=1.0))\n"
        "        self.assertNotEqual(key(1, x=1), key(1, x=1.0))\n\n",
        "ids": lambda tests: (
            ["tests/test_keys.py::CacheKeysTest::test_typedkey_kwargs"],
            [
                f"tests/test_keys.py::CacheKeysTest::{name}"
                for name in ("test_hashkey", "test_typedkey", "test_typedmethodkey", "test_addkeys", "test_pickle")
            ],
        ),
        "other_pass_to_pass": [],
        "test_command": "PYTHONPATH=src python3 -m pytest -rA -p no:cacheprovider tests/test_keys.py",
        "environment_setup": [VENV, f'"$ROLLBOX_SWE_ENV/bin/pip" install --quiet {PYTEST}'],
    },
    {
        "instance_id": "gweis__isodate-duration-neg",
        "repo_name": "isodate",
        "package": "isodate",
        "version": "0.6.1",
        "sha256": "48c5881de7e8b0a0d648cb024c8062dc84e7b840ed81e864c7614fd3c127bde9",
        "problem_statement": (
            "Negating an `isodate.Duration` keeps its months positive: `-Duration(years=1, "
            "months=1)` equals `Duration(years=-1, months=1)` instead of `Duration(years=-1, "
            "months=-1)`. Fix `Duration.__neg__` in `src/isodate/duration.py`."
        ),
        "source": "src/isodate/duration.py",
        "fixed": "        negduration = Duration(years=-self.years, months=-self.months)\n",
        "buggy": "        negduration = Duration(years=-self.years, months=self.months)\n",
        # Fixes __neg__ and also shortens repr(): breaks PASS_TO_PASS test_repr.
        "breaking": "        negduration = Duration(years=-self.years, months=-self.months)\n",
        "breaking_extra": (
            '        return "%s.%s(%d, %d, %d, years=%d, months=%d)" % (\n'
            "            self.__class__.__module__, self.__class__.__name__,\n",
            '        return "%s(%d, %d, %d, years=%d, months=%d)" % (\n            self.__class__.__name__,\n',
        ),
        "test_file": "src/isodate/tests/test_duration.py",
        "tests_taken_out": "    def test_neg(self):\n"
        "        '''\n        Test __neg__ for Duration objects.\n        '''\n"
        "        self.assertEqual(-Duration(0), Duration(0))\n"
        "        self.assertEqual(-Duration(years=1, months=1),\n"
        "                         Duration(years=-1, months=-1))\n"
        "        self.assertEqual(-Duration(years=1, months=1), Duration(months=-13))\n"
        "        self.assertNotEqual(-Duration(years=1), timedelta(days=-365))\n"
        "        self.assertNotEqual(-timedelta(days=365), Duration(years=-1))\n"
        "        # FIXME: this test fails in python 3... it seems like python3\n"
        "        #        treats a == b the same b == a\n"
        "        # self.assertNotEqual(-timedelta(days=10), -Duration(days=10))\n\n",
        "ids": lambda tests: (
            # test_format formats a negated Duration too: the bug breaks it, the fix mends it.
            [
                "src/isodate/tests/test_duration.py::DurationTest::test_neg",
                "src/isodate/tests/test_duration.py::DurationTest::test_format",
            ],
            [
                f"src/isodate/tests/test_duration.py::DurationTest::{name}"
                for name in (
                    "test_associative",
                    "test_equal",
                    "test_hash",
                    "test_parseerror",
                    "test_repr",
                    "test_totimedelta",
                    "test_typeerror",
                )
            ]
            + [
                f"src/isodate/tests/test_pickle.py::TestPickle::{name}"
                for name in ("test_pickle_datetime", "test_pickle_duration", "test_pickle_utc")
            ],
        ),
        "other_pass_to_pass": [],
        "test_command": "PYTHONPATH=src python3 -m pytest -rA -p no:cacheprovider "
        "src/isodate/tests/test_duration.py src/isodate/tests/test_pickle.py",
        # The project's own declared dependencies (six), from the checkout, and pytest.
        "environment_setup": [
            VENV,
            f'"$ROLLBOX_SWE_ENV/bin/pip" install --quiet -r src/isodate.egg-info/requires.txt {PYTEST}',
        ],
    },
]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def git(*args, cwd=None):
    env = dict(os.environ, **GIT_ENV)
    # The sdist's files keep their archived owner when extracted as root: trust the folder.
    done = subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def sdist(task, sdists):
    name = f"{task['package']}-{task['version']}.tar.gz"
    path = sdists / name
    if not path.exists():
        sdists.mkdir(parents=True, exist_ok=True)
        pin = f"{task['package']}=={task['version']}"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*command, "-d", str(sdists), pin], capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            fail(f"failed to download the sdist {pin} with pip: {done.stderr.strip()}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != task["sha256"]:
        fail(f"{path} has sha256 {digest}, not the pinned {task['sha256']}; delete it and run again")
    return path


def replace_once(path, old, new):
    text = path.read_text()
    if text.count(old) != 1:
        fail(f"{path}: expected the text to change exactly once, found it {text.count(old)} times:\n{old}")
    path.write_text(text.replace(old, new))


def diff_of(work, edits):
    """The patch that `edits` (path, old, new) make to the base commit's files."""
    for path, old, new in edits:
        replace_once(work / path, old, new)
    patch = git("diff", cwd=work)
    git("checkout", "--quiet", "--", ".", cwd=work)
    return patch


def build_task(task, out, sdists, scratch):
    with tarfile.open(sdist(task, sdists)) as archive:
        archive.extractall(scratch, filter="data") if sys.version_info >= (3, 12) else archive.extractall(scratch)
    work = scratch / f"{task['package']}-{task['version']}"
    for cache in list(work.rglob("__pycache__")):
        shutil.rmtree(cache)
    tests = (work / task["test_file"]).read_text()
    fail_to_pass, pass_to_pass = task["ids"](tests)
    pass_to_pass += task["other_pass_to_pass"]
    # The base commit: the bug back in, the tests that catch it out.
    replace_once(work / task["source"], task["fixed"], task["buggy"])
    if "tests_taken_out" in task:
        test_edit = (task["test_file"], "", task["tests_taken_out"])
        replace_once(work / task["test_file"], task["tests_taken_out"], "")
    else:
        after = task["tests_added_after"]
        test_edit = (task["test_file"], after, after + task["tests_added"])
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("add", "--all", cwd=work)
    git("commit", "--quiet", "-m", f"{task['package']} {task['version']} with a bug reintroduced", cwd=work)
    base_commit = git("rev-parse", "HEAD", cwd=work).strip()
    gold = diff_of(work, [(task["source"], task["buggy"], task["fixed"])])
    if test_edit[1] == "":
        # Put the taken-out tests back where they were: apply the reverse of taking them out.
        original = tests
        (work / task["test_file"]).write_text(original)
        test_patch = git("diff", cwd=work)
        git("checkout", "--quiet", "--", ".", cwd=work)
    else:
        test_patch = diff_of(work, [test_edit])
    breaking_edits = [(task["source"], task["buggy"], task["breaking"])]
    if "breaking_extra" in task:
        breaking_edits.append((task["source"], *task["breaking_extra"]))
    breaking = diff_of(work, breaking_edits)
    bare = out / "repos" / f"{task['repo_name']}.git"
    if bare.exists():
        shutil.rmtree(bare)
    git("clone", "--quiet", "--bare", str(work), str(bare))
    (out / "breaking").mkdir(parents=True, exist_ok=True)
    (out / "breaking" / f"{task['instance_id']}.patch").write_text(breaking)
    return {
        "instance_id": task["instance_id"],
        "repo": f"repos/{task['repo_name']}.git",
        "base_commit": base_commit,
        "environment_setup_commit": base_commit,
        "version": task["version"],
        "problem_statement": task["problem_statement"],
        "patch": gold,
        "test_patch": test_patch,
        # JSON-encoded strings, as in SWE-bench's published files.
        "FAIL_TO_PASS": json.dumps(fail_to_pass),
        "PASS_TO_PASS": json.dumps(pass_to_pass),
        "environment_setup": task["environment_setup"],
        "test_command": task["test_command"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sdists", type=Path, help="where the sdists are (or are downloaded to)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sdists = (args.sdists or out / "sdists").resolve()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for task in TASKS:
            rows.append(build_task(task, out, sdists, Path(scratch)))
    with open(out / "tasks.jsonl", "w") as dataset:
        for row in rows:
            dataset.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} tasks to {out / 'tasks.jsonl'}")


if __name__ == "__main__":
    main()
