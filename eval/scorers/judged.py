"""Benchmarks a GPT judge grades: the grader prompts, the parsing of its replies and the aggregation
(``eval/judge.py`` sends the prompts).

Ports: MM-Vet's GPT grader (``mm-vet_evaluator``, as ported in Video-LLaVA ``scripts/eval_gpt_mmvet.py``)
with LLaVA ``scripts/convert_mmvet_for_eval.py``; Video-ChatGPT / Video-LLaVA ``eval_video_qa.py``.
Quirks of the originals are kept on purpose (each is marked "upstream quirk").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable


# ---------------------------------------------------------------------------------------------
# MM-Vet: convert_mmvet_for_eval.py + the GPT grader's aggregation
# ---------------------------------------------------------------------------------------------


def convert_mmvet(records: Iterable[dict]) -> dict:
    return {f"v1_{r['question_id']}": r["text"] for r in records}


MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def mmvet_grader_prompt(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    text = MMVET_PROMPT + "\n" + " | ".join(
        [question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), prediction, ""])
    return text + "\nPredict the correctness of the answer (digit): " if retry else text


def mmvet_parse_score(content: str) -> float | None:
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def score_mmvet(grades: dict[str, float], metadata: dict) -> dict:
    """Total and per-capability scores x 100 (one grading run): a capability's score is the sum
    of its samples' grades over its sample count."""
    caps: dict[str, list[float]] = defaultdict(list)
    for key, item in metadata.items():
        for c in set(item["capability"]):
            caps[c].append(grades.get(key, 0.0))
    total = sum(grades.get(k, 0.0) for k in metadata) / len(metadata) * 100 if metadata else 0.0
    return {"total": total, "capabilities": {c: 100.0 * sum(v) / len(v) for c, v in caps.items()},
            "graded": sum(1 for k in metadata if k in grades), "questions": len(metadata),
            "units": [{"id": str(k), "v": {"grade": float(grades.get(k, 0.0))}} for k in metadata]}


# ---------------------------------------------------------------------------------------------
# Video QA: Video-LLaVA / Video-ChatGPT eval_video_qa.py
# ---------------------------------------------------------------------------------------------

VIDEOQA_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)


def videoqa_user_prompt(question: str, answer: str, pred: str) -> str:
    return ("Please evaluate the following video-based question-answer pair:\n\n"
            f"Question: {question}\n"
            f"Correct Answer: {answer}\n"
            f"Predicted Answer: {pred}\n\n"
            "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
            "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
            "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
            "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.")


def score_videoqa(judgements: dict[str, dict]) -> dict:
    """eval_video_qa.py aggregation: Accuracy = #yes / (#yes + #no) (a 'pred' containing 'yes'
    counts yes, else one containing 'no' counts no); Score = sum of int(score) / #judged
    (an entry whose fields do not parse still counts in the denominator, upstream quirk)."""
    score_sum = count = yes = no = 0
    units = []  # per judged item: its share of each sum (yes, yes-or-no, score)
    for key, result in judgements.items():
        count += 1
        u = {"yes": 0, "judged_yn": 0, "score": 0}
        units.append({"id": str(key), "v": u})
        try:
            s = int(result["score"])
            score_sum += s
            u["score"] = s
            pred = result["pred"]
            if "yes" in pred.lower():
                yes += 1
                u["yes"] = u["judged_yn"] = 1
            elif "no" in pred.lower():
                no += 1
                u["judged_yn"] = 1
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return {"accuracy": 100.0 * yes / (yes + no) if yes + no else 0.0, "score": score_sum / count if count else 0.0,
            "yes": yes, "no": no, "judged": count, "units": units}
