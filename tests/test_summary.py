"""The search summary's Pareto front of best score vs NFE (hand-made final tables)."""

from s3_ray.search.driver import pareto_front, summary_markdown


def _row(nfe, searched, baseline, exported):
    return {"nfe": nfe, "searched": searched, "searched_hash": "abc", "best_baseline": "ddim/edm",
            "best_baseline_score": baseline, "exported": exported, "ratio": None}


def test_front_keeps_each_nfe_that_beats_every_smaller_one():
    rows = [_row(5, 0.30, 0.25, "ddim/edm"), _row(3, 0.50, 0.90, "s3a"), _row(4, 0.60, 0.55, "unipc/edm"),
            _row(6, None, 0.10, "unipc/tq")]
    front = pareto_front(rows)
    # NFE 4's best (0.55) loses to NFE 3's (0.50): off the front; NFE 5 uses its baseline (0.25 < 0.30)
    assert front == [{"nfe": 3, "score": 0.50, "schedule": "s3a"}, {"nfe": 5, "score": 0.25, "schedule": "ddim/edm"},
                     {"nfe": 6, "score": 0.10, "schedule": "unipc/tq"}]
    summary = {"name": "x", "metric": "fid", "reference": "data", "final_samples": 10, "final_seeds": [1],
               "converged": 0.01, "rows": sorted(rows, key=lambda r: r["nfe"]), "pareto": front}
    for r in summary["rows"]:
        r["searched"] = r["searched"] if r["searched"] is not None else 0.2
    md = summary_markdown(summary)
    assert ("Pareto front (best final score vs NFE): NFE 3: 0.500 (s3a), NFE 5: 0.250 (ddim/edm), "
            "NFE 6: 0.100 (unipc/tq); off the front (a smaller NFE does as well): 4") in md


def test_a_monotone_table_is_all_front():
    rows = [_row(k, 1.0 / k, 2.0 / k, f"s{k}") for k in (3, 4, 5)]
    assert [p["nfe"] for p in pareto_front(rows)] == [3, 4, 5]


def test_the_table_names_the_winner_per_nfe():
    rows = [_row(3, 0.50, 0.90, "abc"), _row(4, 0.60, 0.55, "ddim/edm"), _row(5, 0.1, 0.20, "abc")]
    summary = {"name": "x", "metric": "fid", "reference": "data", "final_samples": 10, "final_seeds": [1],
               "converged": 0.01, "rows": rows}
    md = summary_markdown(summary).splitlines()
    assert md[4].endswith("| converged | winner |")
    assert md[6].endswith("| 0.010 | S3 |") and md[7].endswith("| 0.010 | ddim/edm |") and md[8].endswith("| S3 |")
