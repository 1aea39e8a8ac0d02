"""Official scoring rules, one function per official script, ported line by line.

Sources (docs/evaluation.md, section 2); each module's docstring names the upstream files it ports:

* ``vqa``: EvalAI answer processor, TextVQA soft accuracy, VQAv2 (submission and val accuracy), VizWiz:
  haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py``, ``eval_textvqa.py``, ``scripts/convert_*.py``; the VQA
  API ``vqaEval.py`` as used for VQAv2 val by lmms-eval (``tasks/vqav2/utils.py``);
* ``gqa``: the GQA evaluation script ``eval.py`` (accuracy / binary / open over balanced questions);
* ``yesno``: POPE (LLaVA ``eval_pope.py``) and MME (``playground/data/eval/MME/convert_answer_to_mme.py``
  and MME's ``eval_tool/calculation.py``);
* ``choice``: ScienceQA (LLaVA ``eval_science_qa.py``) and SEED-Bench (``scripts/convert_seed_for_submission.py``);
* ``mmbench``: VLMEvalKit ``vlmeval/utils/matching_util.py`` and ``vlmeval/evaluate/multiple_choice.py`` at
  commit c6bdffd3 (2024-03-19): option matching (``can_infer``), the rule stage of the official MMBench
  evaluator, and CircularEval;
* ``judged``: MM-Vet's GPT grader (``mm-vet_evaluator``; as ported in Video-LLaVA ``scripts/eval_gpt_mmvet.py``)
  and Video-ChatGPT / Video-LLaVA ``eval_video_qa.py`` (judge aggregation).

Quirks of the originals are kept on purpose (each is marked "upstream quirk") because they change
numbers; where an original would crash, the behaviour chosen here is marked "deviation".

Every public name is re-exported here: ``from eval import scorers; scorers.score_pope(...)``.
"""

from __future__ import annotations

from .choice import SQA_OPTIONS, convert_seed_upload, score_seed, score_sqa, sqa_parse
from .gqa import convert_gqa_predictions, score_gqa
from .judged import (MMVET_PROMPT, VIDEOQA_SYSTEM, convert_mmvet, mmvet_grader_prompt, mmvet_parse_score,
                     score_mmvet, score_videoqa, videoqa_user_prompt)
from .mmbench import (MMB_CIRCULAR, MMB_L2_ABBRS, PANDAS_NA_STRINGS, mmb_can_infer, mmb_can_infer_option,
                      mmb_can_infer_text, mmb_prediction_cell, score_mmbench_local)
from .vqa import (EvalAIAnswerProcessor, convert_vizwiz_submission, convert_vqav2_submission, evalai_normalize,
                  score_textvqa, score_vqav2_val, textvqa_answer_scores, textvqa_question_from_prompt,
                  vqa_accuracy)
from .yesno import (MME_COGNITION, MME_PERCEPTION, SHORT_ANSWER, mme_convert, mme_parse, mme_task_score,
                    pope_confusion, pope_metrics, pope_parse, score_mme, score_pope)

__all__ = [
    # vqa
    "EvalAIAnswerProcessor", "evalai_normalize", "textvqa_answer_scores", "textvqa_question_from_prompt",
    "score_textvqa", "convert_vqav2_submission", "vqa_accuracy", "score_vqav2_val", "convert_vizwiz_submission",
    # gqa
    "convert_gqa_predictions", "score_gqa",
    # yesno
    "pope_parse", "pope_confusion", "pope_metrics", "score_pope",
    "MME_PERCEPTION", "MME_COGNITION", "SHORT_ANSWER", "mme_convert", "mme_parse", "mme_task_score", "score_mme",
    # choice
    "SQA_OPTIONS", "sqa_parse", "score_sqa", "score_seed", "convert_seed_upload",
    # mmbench
    "mmb_can_infer_option", "mmb_can_infer_text", "mmb_can_infer", "PANDAS_NA_STRINGS", "MMB_L2_ABBRS",
    "MMB_CIRCULAR", "mmb_prediction_cell", "score_mmbench_local",
    # judged
    "convert_mmvet", "MMVET_PROMPT", "mmvet_grader_prompt", "mmvet_parse_score", "score_mmvet",
    "VIDEOQA_SYSTEM", "videoqa_user_prompt", "score_videoqa",
]
