"""The scorers equal the official scoring scripts: small hand-written answers whose official scores
are worked out by hand in the comments (evaluation.md section 5)."""

import pytest

from eval import scorers as S


# ---------------------------------------------------------------- EvalAI normalisation (VQAv2 / VizWiz / TextVQA)
@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),          # lower-case, number word -> digit, trailing period stripped
    ("The cat's toy", "cat 's toy"),  # "'s" split off, article dropped
    ("1,000", "1000"),                # word_tokenize deletes commas
    ("dont", "don't"),                # contraction restored
    ("3.5", "3.5"),                   # a period inside a number stays
    ("a/b", "b"),                     # '/' -> space (no ' /' or '/ '), then the article 'a' is dropped
    ("yes / no", "yes no"),           # ' / ' present -> '/' deleted
    ("none", "0"),                    # NUMBER_MAP maps 'none' to '0'
    ("Hello-World!", "hello world"),  # '-' and '!' become spaces
])
def test_evalai_processor(raw, norm):
    assert S.evalai_normalize(raw) == norm


def test_evalai_period_quirk():
    # upstream passes re.UNICODE (32) as the *count* of PERIOD_STRIP.sub: only 32 periods go
    assert S.evalai_normalize("." * 40 + "a") == "." * 8 + "a"


# ---------------------------------------------------------------- VQA soft accuracy
def test_textvqa_soft_scores():
    gts = ["dakota"] * 8 + ["kodak"] * 2
    s = S.textvqa_answer_scores(gts)
    # 'dakota': every leave-one-out subset keeps >= 7 'dakota' -> min(1, 7/3) = 1 -> 1.0
    assert s["dakota"] == 1.0
    # 'kodak': 8 subsets leave out a 'dakota' (2 matches -> 2/3), 2 leave out a 'kodak' (1 -> 1/3):
    # (8 * 2/3 + 2 * 1/3) / 10 = 18/30 = 0.6
    assert s["kodak"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        S.textvqa_answer_scores(["a"] * 9)


def test_vqa_accuracy_official_rule():
    gts = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]
    # humans disagree -> punctuation/digit processing on both sides: 'two' -> '2' (nine '2', one '3')
    assert S.vqa_accuracy("Two", gts) == pytest.approx(1.0)
    # '3': 9 subsets drop a '2' and keep the one '3' -> 1/3; the subset dropping '3' -> 0: 9/3/10 = 0.3
    assert S.vqa_accuracy("3", gts) == pytest.approx(0.3)
    assert S.vqa_accuracy("four", gts) == 0.0


def test_textvqa_prompt_question_recovery():
    p = "What is the brand?\nReference OCR token: DAKOTA, DIGITAL\nAnswer the question using a single word or phrase."
    assert S.textvqa_question_from_prompt(p) == "what is the brand?"
    assert S.textvqa_question_from_prompt("What time?\nAnswer the question using a single word or phrase.") == "what time?"
    assert S.textvqa_question_from_prompt("OCR tokens: a b Question: Who? Short answer:") == "who?"


# ---------------------------------------------------------------- POPE
@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"),
    ("Yes, there is a dog. No", "yes"),   # only the first sentence counts
    ("There is no dog", "no"),
    ("not at all", "no"),
    ("Not sure", "yes"),                  # 'Not' (capital) is not in the list
    ("Nope", "yes"),
    ("yes, no", "no"),                    # comma removed -> words 'yes' 'no'
])
def test_pope_parse(text, parsed):
    assert S.pope_parse(text) == parsed


def test_pope_per_split_mean_and_pooled():
    questions = {1: "adversarial", 2: "adversarial", 3: "popular", 4: "popular", 5: "random", 6: "random"}
    labels = {"adversarial": ["no", "yes"], "popular": ["yes", "no"], "random": ["yes", "no"]}
    answers = [{"question_id": 1, "text": "No"}, {"question_id": 2, "text": "Yes"},
               {"question_id": 3, "text": "yes"}, {"question_id": 4, "text": "Yes, there is"},
               {"question_id": 5, "text": "Yes"}, {"question_id": 6, "text": "not sure"}]
    r = S.score_pope(answers, questions, labels)
    # adversarial: TN, TP -> F1 1;  popular: TP, FP -> P 1/2, R 1, F1 2/3;  random: TP, TN -> F1 1
    assert r["categories"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert r["f1_avg3"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)  # 88.89
    # pooled: TP 3, FP 1, TN 2, FN 0 -> P 0.75, R 1, F1 = 1.5 / 1.75 = 0.857142...
    assert r["f1_pooled"] == pytest.approx(100 * 1.5 / 1.75)
    assert r["acc_avg3"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert r["acc_pooled"] == pytest.approx(100 * 5 / 6)


def test_pope_pairs_by_order_not_id():
    # labels are read in file order and zipped with the category's answers in answer order
    labels = {"random": ["yes", "no"]}
    qs = {10: "random", 11: "random"}
    right = S.score_pope([{"question_id": 10, "text": "yes"}, {"question_id": 11, "text": "no"}], qs, labels)
    swapped = S.score_pope([{"question_id": 11, "text": "no"}, {"question_id": 10, "text": "yes"}], qs, labels)
    assert right["acc_avg3"] == 100.0 and swapped["acc_avg3"] == 0.0


def test_pope_degenerate_is_flagged():
    c = S.pope_confusion(["no", "no"], ["yes", "no"])  # upstream: ZeroDivisionError (no 'yes' predicted)
    m = S.pope_metrics(c)
    assert m["degenerate"] and m["f1"] == 0.0 and m["accuracy"] == 0.5


# ---------------------------------------------------------------- MME
@pytest.mark.parametrize("pred, label", [("yes", "yes"), ("no", "no"), ("no, it is not", "no"), ("yes.", "yes"),
                                         ("i think so", "other"), ("nope", "no"), ("", "other")])
def test_mme_parse(pred, label):
    assert S.mme_parse(pred) == label


def test_mme_acc_plus_and_sums():
    def rows(*pairs):  # (gt, pred) -> official tuples, two consecutive lines per image
        return [("0.txt", "q", g, p) for g, p in pairs]

    # image 1: both right; image 2: one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    t = S.mme_task_score(rows(("Yes", "Yes"), ("No", "No"), ("Yes", "yes"), ("No", "Yes")))
    assert (t["acc"], t["acc_plus"], t["score"]) == (75.0, 50.0, 125.0)
    # 'other' counts as wrong
    assert S.mme_task_score(rows(("Yes", "maybe"), ("No", "no")))["score"] == 50.0
    full = {c: rows(("Yes", "Yes"), ("No", "Yes")) for c in S.MME_PERCEPTION + S.MME_COGNITION}  # 50 each
    full["existence"] = rows(("Yes", "Yes"), ("No", "No"))  # 200
    r = S.score_mme(full)
    assert r["perception"] == 9 * 50 + 200 and r["cognition"] == 4 * 50 and r["total"] == 850


def test_mme_converter_restores_prompt():
    gt = {("count", "1.txt", "How many? Please answer yes or no."): "Yes",
          ("count", "1.txt", "Is it two?  Please answer yes or no."): "No"}  # double space in the release file
    recs = [{"question_id": "count/1.png", "prompt": "How many?\nAnswer the question using a single word or phrase.", "text": "Yes"},
            {"question_id": "count/1.png", "prompt": "Is it two?\nAnswer the question using a single word or phrase.", "text": "No"}]
    out = S.mme_convert(recs, gt)
    assert out["count"] == [("1.txt", "How many? Please answer yes or no.", "Yes", "Yes"),
                            ("1.txt", "Is it two?  Please answer yes or no.", "No", "No")]


# ---------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. apostrophe", "B"), ("The answer is C.", "C"),
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("The answer is D!", "D"),                        # upstream regex: the final '.' matches any character
    ("(B)", "FAILED"), ("b", "FAILED"), ("F", "FAILED"),
])
def test_sqa_parse(text, letter):
    assert S.sqa_parse(text) == letter


def test_sqa_scores_and_missing_quirk():
    problems = {"1": {"choices": ["x", "y"], "answer": 1}, "2": {"choices": ["x", "y", "z"], "answer": 2},
                "3": {"choices": ["x", "y"], "answer": 0}, "4": {"choices": ["x", "y"], "answer": 0}}
    recs = [{"question_id": "1", "prompt": "q", "text": "B"},                       # text-only, right
            {"question_id": "2", "prompt": "<image>\nq", "text": "The answer is C."},  # image, right
            {"question_id": "3", "prompt": "<image>\nq", "text": "C"}]              # image, 'C' is not among 2 choices -> wrong
    r = S.score_sqa(recs, problems, ["1", "2", "3", "4"])
    # "4" has no prediction -> FAILED with prompt 'Unknown': wrong, and not in the IMG subset
    assert (r["correct"], r["total"], r["img_total"]) == (2, 4, 2)
    assert r["accuracy"] == 50.0 and r["img_accuracy"] == 50.0


# ---------------------------------------------------------------- GQA
def test_gqa_convert_and_exact_match():
    recs = [{"question_id": "1", "text": "Yes."}, {"question_id": "2", "text": "Red car"}, {"question_id": "3", "text": "Left.."}]
    preds = S.convert_gqa_predictions(recs)
    assert [p["prediction"] for p in preds] == ["yes", "red car", "left"]
    qs = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
          "2": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
          "3": {"answer": "left", "isBalanced": True, "types": {"structural": "choose"}}}
    r = S.score_gqa(preds, qs)
    # exact match: yes ok, 'red car' != 'red', left ok -> 2/3; binary (verify, choose) 2/2; open (query) 0/1
    assert r["accuracy"] == pytest.approx(200 / 3) and r["binary"] == 100.0 and r["open"] == 0.0
    with pytest.raises(ValueError, match="no prediction"):
        S.score_gqa(preds[:2], qs)  # the official evaluator requires every balanced question


# ---------------------------------------------------------------- SEED
def test_seed_exact_letter():
    ann = {"question_type": {"Scene": 1, "Action": 10},
           "questions": [{"question_id": "1", "data_type": "image", "question_type_id": 1, "answer": "A"},
                         {"question_id": "2", "data_type": "image", "question_type_id": 1, "answer": "B"},
                         {"question_id": "3", "data_type": "video", "question_type_id": 10, "answer": "C"},
                         {"question_id": "4", "data_type": "video", "question_type_id": 10, "answer": "D"}]}
    recs = [{"question_id": 1, "text": "A"}, {"question_id": 2, "text": "B."}, {"question_id": 3, "text": "C"}]
    r = S.score_seed(recs, ann)
    # 'B.' != 'B' (no normalisation); question 4 unanswered counts as wrong: all 2/4, image 1/2, video 1/2
    assert (r["all"], r["image"], r["video"]) == (50.0, 50.0, 50.0)
    assert r["per_type"] == {"Scene": 50.0, "Action": 50.0}


# ---------------------------------------------------------------- MMBench option matching
@pytest.mark.parametrize("answer, hit", [
    ("B", "B"), ("The answer is B.", "B"), ("(C) cat", "C"),
    ("A cat", "A"),            # 'A' as a standalone token wins (the quantifier check only runs with VERBOSE)
    ("rabbit", "B"),           # no letter: unique option text
    ("a cat and a dog", False),  # two option texts
    ("A or B", False),         # two letters
    ("Z", "Z"),
    ("Cannot determine the answer", "Z"),
])
def test_mmbench_can_infer(answer, hit):
    assert S.mmb_can_infer(answer, {"A": "teddy bear", "B": "rabbit", "C": "cat", "D": "dog"}) == hit


def test_mmbench_local_single_and_circular():
    opts = ["teddy bear", "rabbit", "cat"]
    rot1, rot2 = opts[1:] + opts[:1], opts[2:] + opts[:2]
    recs = [  # question 0 (answer A = teddy bear), three rounds with the options rotated
        {"question_id": 0, "round_id": 0, "options": opts, "option_char": ["A", "B", "C"], "text": "A"},
        {"question_id": 0, "round_id": 1, "options": rot1, "option_char": ["B", "C", "A"], "text": "C"},  # C -> 'teddy bear'
        {"question_id": 0, "round_id": 2, "options": rot2, "option_char": ["C", "A", "B"], "text": "A"},  # A -> 'cat': wrong
        # question 1 (answer B), single round, answered by text
        {"question_id": 1, "round_id": 0, "options": opts, "option_char": ["A", "B", "C"], "text": "a rabbit"},
    ]
    rows = [{"index": i, "answer": a, "choices": dict(zip("ABC", opts)), "category": "c", "l2-category": "l2",
             "split": "dev"} for i, a in ((0, "A"), (1, "B"))]
    r = S.score_mmbench_local(recs, rows)
    assert r["single_row_accuracy"] == 100.0  # round 0 of both questions right
    assert r["accuracy"] == 100.0             # no circular copies (index >= 1e6) in these rows
    assert r["rounds_accuracy"] == 50.0       # question 0 fails LLaVA's round 2 (--all-rounds)


# ---------------------------------------------------------------- LLM-judged aggregation
def test_videoqa_aggregation():
    j = {"a": {"pred": "yes", "score": 4}, "b": {"pred": "no", "score": 1}, "c": {"pred": "Yes", "score": "5"},
         "d": {"pred": "no", "score": "x"}}  # unparseable score: counted in #judged, not in yes/no
    r = S.score_videoqa(j)
    # accuracy = 2 yes / (2 yes + 1 no); score = (4 + 1 + 5) / 4 judged
    assert r["accuracy"] == pytest.approx(200 / 3) and r["score"] == pytest.approx(2.5)


def test_mmvet_grader_prompt_and_aggregation():
    p = S.mmvet_grader_prompt("What is x?", "-1<AND>-5", "x = 3")
    assert p.endswith("\nWhat is x? | -1 <AND> -5 | x = 3 | ")
    assert S.mmvet_parse_score("0.5") == 0.5 and S.mmvet_parse_score("1.0 ok") == 1.0
    assert S.mmvet_parse_score("great") is None and S.mmvet_parse_score("1.5") is None
    meta = {"v1_0": {"capability": ["ocr", "math"]}, "v1_1": {"capability": ["rec"]}}
    r = S.score_mmvet({"v1_0": 0.5, "v1_1": 1.0}, meta)
    assert r["total"] == pytest.approx(75.0) and r["capabilities"] == {"ocr": 50.0, "math": 50.0, "rec": 100.0}


def test_vqav2_and_vizwiz_upload():
    up = S.convert_vqav2_submission([{"question_id": 1, "text": "Two."}], [{"question_id": 1}, {"question_id": 2}])
    assert up == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": ""}]
    viz = S.convert_vizwiz_submission([{"question_id": 0, "text": "Unanswerable"}], [{"question_id": 0, "image": "a.jpg"}])
    assert viz == [{"image": "a.jpg", "answer": "unanswerable"}]
