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


def test_macro_f1_leaves_out_a_label_with_no_gold_and_no_predicted_row():
    """Label c occurs in neither the gold nor the predicted rows: macro-F1 is the mean over a and b
    only, (2/3 + 0.8) / 2, not over all three labels."""
    r = classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "c"])
    assert r["per_class"]["a"]["f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert r["per_class"]["b"]["f1"] == pytest.approx(0.8)  # precision 2/3, recall 1
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
