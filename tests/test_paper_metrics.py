"""SQuAD EM/F1 and MATH's exact final answer against hand-worked values."""

from tpv.metrics import boxed_answer, compute_metric


def test_squad_em_and_f1_take_the_best_gold_answer():
    preds, refs = ["The Eiffel Tower!", "eiffel", "unanswerable", ""], [["eiffel tower", "x"], ["eiffel tower"], [], ["y"]]
    assert compute_metric("squad_em", preds, refs) == 0.5  # 1 + 0 + 1 (no answer) + 0
    # F1: 1, 2*(1*0.5)/(1.5)=2/3, 1, 0
    assert abs(compute_metric("squad_f1", preds, refs) - (1 + 2 / 3 + 1 + 0) / 4) < 1e-12


def test_math_exact_compares_the_last_boxed_answer():
    assert boxed_answer(r"so \boxed{\frac{1}{2}} then \boxed{3}.") == "3"
    preds = [r"thus $\boxed{ \frac{1}{2} }$.", r"\boxed{4}", "7"]
    refs = [r"We get \boxed{\frac{1}{2}}", r"\boxed{5}", r"\boxed{7}"]
    assert compute_metric("math_exact", preds, refs) == 2 / 3
