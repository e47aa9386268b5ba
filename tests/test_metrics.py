import pytest

from softprompt.metrics import classification_report


def test_report_matches_hand_computed_values():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    r = classification_report(gold, pred, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    f1_b, f1_c = 0.5, 2 / 3
    assert r["macro_f1"] == pytest.approx((0.8 + f1_b + f1_c) / 3)
