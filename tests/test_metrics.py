from agentpeft.pipeline.evaluate import score


def test_accuracy_looks_for_the_normalized_key():
    refs = [{"answer": "It is 45 days.", "key": "45 days"}, {"answer": "HD-220", "key": "HD-220"},
            {"answer": "The Ember Circle.", "key": "Ember Circle"}]
    preds = ["You have 45 Days to return it!", "The code is HD 220.", "It's the loyalty club."]
    assert score(preds, refs, ["accuracy"])["accuracy"] == round(2 / 3, 4)


def test_accuracy_needs_whole_words():
    assert score(["It costs 1450 dollars"], [{"answer": "", "key": "450"}], ["accuracy"])["accuracy"] == 0.0


def test_rouge_l_is_one_for_identical_and_lower_otherwise():
    refs = [{"answer": "Refunds take nine business days.", "key": "nine"}]
    assert score(["Refunds take nine business days."], refs, ["rouge_l"])["rouge_l"] == 1.0
    assert 0 < score(["Refunds take a while."], refs, ["rouge_l"])["rouge_l"] < 1
