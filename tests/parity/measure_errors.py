"""Measure the worst error of every tolerance family over all parity fixtures.

Runs the parity tests in-process with ``JAXDIFF_PARITY_ERRORS`` set, so that every comparison in
``_fixtures.py`` appends its error envelope (the largest |actual - expected| in each decade of
|expected|) and its worst ratio to the allowed bound; then prints, per family, the worst
absolute error where the family's atol dominates, the worst relative error where its rtol
dominates, and the worst ratio:

    python tests/parity/measure_errors.py [--log FILE] [pytest args, default tests/parity]

A ratio of 0.1 means the worst element uses a tenth of its tolerance: the ~10x margin the
constants in ``_fixtures.py`` are set to. ``--log FILE`` keeps (and, if it exists, only reads)
the raw log.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))


def run(path: pathlib.Path, args: list[str]) -> int:
    os.environ["JAXDIFF_PARITY_ERRORS"] = str(path)
    import pytest  # _fixtures reads the variable at import, which pytest does later

    # the live test measures nothing; the NaN and mutation tests fail comparisons on purpose
    names = ("test_live", "test_comparisons", "test_mutations")
    skip = [f"--ignore=tests/parity/{name}.py" for name in names]
    return int(pytest.main(["-q", "-p", "no:cacheprovider", *skip, *(args or ["tests/parity"])]))


def summarise(rows: list[dict]) -> None:
    from tests.parity import _fixtures

    tols = {v.name: v for v in vars(_fixtures).values() if isinstance(v, _fixtures.Tol)}
    edges = _fixtures.ENVELOPE_EDGES
    by_family = collections.defaultdict(list)
    for row in rows:
        if not any(name in row["test"] for name in ("test_comparisons", "test_mutations")):
            by_family[row["family"]].append(row)
    header = ("family", "rtol", "atol", "checks", "max abs", "max rel", "ratio")
    print("\n{:<11} {:>8} {:>8} {:>6} {:>9} {:>9} {:>6}  worst ratio at".format(*header))
    for family in sorted(by_family):
        group, tol = by_family[family], tols.get(family)
        knee = tol.atol / tol.rtol if tol and tol.rtol else float("inf")
        max_abs = max_rel = 0.0
        for row in group:
            for k, (err, rel) in enumerate(zip(row["envelope"], row["rel_envelope"], strict=True)):
                upper = edges[k + 1] if k + 1 < len(edges) else float("inf")
                if upper <= knee:  # this decade of |expected| lies where atol dominates
                    max_abs = max(max_abs, err)
                else:
                    max_rel = max(max_rel, rel)
        worst = max(group, key=lambda r: r["ratio"])
        rtol, atol = (f"{tol.rtol:.1e}", f"{tol.atol:.1e}") if tol else ("?", "?")
        print(
            f"{family:<11} {rtol:>8} {atol:>8} {len(group):>6} {max_abs:>9.2g} {max_rel:>9.2g} "
            f"{worst['ratio']:>6.3f}  {worst['test']} {worst['what']}"
        )


def main(argv: list[str]) -> int:
    log = None
    if argv[:1] == ["--log"]:
        log, argv = pathlib.Path(argv[1]), argv[2:]
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = log or pathlib.Path(tmp) / "errors.jsonl"
        if not path.exists():
            path.touch()
            rc = run(path, argv)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    summarise(rows)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
