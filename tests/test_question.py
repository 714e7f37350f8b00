"""question.py: the rules (the heuristic and dialog teachers), the question-pool augmentations, the arguments,
and the gold error analysis (bench/question_errors.py)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from types import SimpleNamespace

import pytest

import data as mtdata
import question
from question import (
    QuestionArguments,
    augment_questions,
    combine_sentences,
    how_to_verb_phrases,
    is_question_dialog,
    is_question_heuristic,
    mine_traps,
    rephrase_questions,
)
from train import ROOT

# (sentence, is it a question by our heuristic) -- the heuristic's contract, traps included.
HEURISTIC_TABLE = [
    ("what is the capital of france ?", True),
    ("How far is it from Denver to Aspen ?", True),
    ("who was galileo ?", True),
    ("where do you live", True),
    ("why would anyone make this movie", True),
    ("which one do you want", True),
    ("when does the film start", True),
    ("whose idea was this", True),
    ("is there a bank near here", True),
    ("are you coming tonight", True),
    ("do you like it", True),
    ("does it rain much in seattle", True),
    ("can you change some money for me", True),
    ("could you pass the salt", True),
    ("would you like some tea", True),
    ("should i stay or should i go", True),
    ("did you see that", True),
    ("has anyone seen my keys", True),
    ("you did what ?", True),  # declarative question with a '?'
    ("so you 're leaving ?", True),
    ('he asked , " is it true ? "', True),  # closing quote after the '?'
    ("what a film !", False),  # exclamation, not a question
    ("what an awful mess", False),
    ("how wonderful !", False),
    ("when the credits roll , you will weep .", False),  # wh-word opens a subordinate clause
    ("what i liked most was the score .", False),
    ("a gorgeous , witty , seductive movie .", False),
    ("it 's a charming and often affecting journey .", False),
    ("the film asks what it means to be human", False),  # wh-word inside, not first
    ("i wonder why", False),
    ("", False),
    ("   ", False),
    ("?", True),
    ("is this any good", True),
    ("great fun !", False),
]


@pytest.mark.parametrize("sentence, expected", HEURISTIC_TABLE)
def test_question_heuristic_table(sentence, expected):
    assert is_question_heuristic(sentence) is expected


def test_heuristic_table_is_large_and_balanced():
    labels = Counter(expected for _, expected in HEURISTIC_TABLE)
    assert len(HEURISTIC_TABLE) >= 30
    assert labels[True] >= 10 and labels[False] >= 10


def test_strip_question_marks():
    assert question.strip_question_marks("What for ?") == "What for"
    assert question.strip_question_marks("really ? ? no way") == "really no way"


# (utterance, is it a question by the dialog teacher): DailyDialog-style acts, where a request or suggestion
# phrased as a question is a directive.
DIALOG_TABLE = [
    ("what is the capital of france ?", True),
    ("How much would you like to change ?", True),
    ("Good morning , sir . Is there a bank near here ?", True),  # the question is the second sentence
    ("What kind of room do you want ? We have single rooms .", True),  # ... or the first
    ("Good morning , sir . Is there a bank near here", True),  # no '?' at all
    ("Well , how long is it from here to the station", True),  # discourse word first
    ("If I buy two , can I get a discount", True),  # a later clause opens the question
    ("Hey there Chris , what are you up to", True),
    ("do you like it", True),
    ("do n't you like it", True),  # SST-2 / DailyDialog tokenization
    ("ca n't you see it ?", True),
    ("is there a bank near here", True),
    ("What ’ s the problem", True),  # contracted wh-word, DailyDialog spacing
    ("how's it going", True),
    ("You did what ?", True),  # declarative question
    ("Can you change some money for me ?", False),  # request
    ("Well , that's too far.Can you change some money for me ?", False),
    ("could you pass the salt", False),
    ("Would you like some tea ?", False),  # offer
    ("How about this afternoon ?", False),  # suggestion
    ("Why don ’ t we meet at 1 ?", False),
    ("Shall we dance ?", False),
    ("May I see your ID , please ?", False),
    ("Good afternoon . May I help you ?", True),  # an offer of service is a question, as "can I help you ?"
    ("may I help you with your bags", True),
    ("Can I have the bill , please ?", False),  # asks for something, as "may I have" and "could I have"
    ("Can I get a refund ?", True),
    ("May I speak to Mr . Smith ?", False),  # "Mr ." ends no sentence: not the declarative question "Smith ?"
    ("Could you come at 9 a . m . tomorrow ?", False),  # nor does "a . m ."
    ("I'm a man . Are you ?", True),  # a lone "a ." still does
    ("Do you mind if I sit down ?", False),
    ("Don't worry .", False),
    ("don't worry", False),  # imperative: no subject after the auxiliary
    ("is pretty damned funny", False),  # SST-2 fragment
    ("Have a pleasant stay", False),
    ("what a film !", False),
    ("how nice of you", False),
    ("when the credits roll , you will weep .", False),
    ("I wonder why", False),
    ("a gorgeous , witty , seductive movie .", False),
    ("when we bought our Subaru , the guy was like", False),  # wh-word + subject: a subordinate clause
    ("which I had done ,", False),
    ("what I see is the trend for children", False),
    ("I have a friend who is working with , uh , who works with travel groups ,", False),  # relative clause
    ("If you go , where is the station", True),  # ... unless an auxiliary follows
    ("How about you ?", True),  # hands the question back
    ("uh , how about yourself ?", True),
    ("Really ?", True),  # DailyDialog's acts: an echo question is a question
    ("and I'm like , well , why can't she come", False),  # a reported question is not asked
    ("and then you go , What ?", False),
    ("He said , ' Do you want me to help you ? '", False),
    ("and now if we go there she 's like , well , what are you doing ?", False),
    ("It 's like , how do you know my name ,", False),
    ("And I'm going well how about this way ?", False),
    ("Where do you go , what do you see ?", True),  # it asks before anything is reported
    ("What did he say ?", True),
    ("I like what I see .", False),
    ("Stay just a few minutes longer , OK ?", False),  # a directive asking for agreement
    ("You have a good evening , all right ?", False),
    ("You voted for him , right ?", True),  # "..., right ?" asks
    ("how shall I say it ,", False),  # a speaker looking for words
    ("so people , uh , how shall I say it , made more effort", False),
    ("How can I put it on ?", True),
    ("", False),
    ("   ", False),
]


@pytest.mark.parametrize("utterance, expected", DIALOG_TABLE)
def test_dialog_teacher_table(utterance, expected):
    assert is_question_dialog(utterance) is expected


def test_dialog_table_is_balanced():
    assert sum(e for _, e in DIALOG_TABLE) >= 10 and sum(not e for _, e in DIALOG_TABLE) >= 10


# The Switchboard convention: backchannels phrased as questions are not questions; the rest as the dialog teacher.
SWITCHBOARD_TABLE = [
    ("Really ?", False),
    ("Oh, really?", False),
    ("oh , yeah ?", False),
    ("Is that right ?", False),
    ("What?", False),
    ("Is that right for your family ?", True),
    ("Really , what did you do then ?", True),
    ("How about you?", True),
    ("Can you change some money for me ?", False),
    ("and then you go , What ?", False),  # reported, as for the dialog teacher
]


@pytest.mark.parametrize("utterance, expected", SWITCHBOARD_TABLE)
def test_switchboard_teacher_table(utterance, expected):
    assert question.is_question_switchboard(utterance) is expected
    if expected:  # the convention only removes backchannels: what it calls a question, the dialog teacher does too
        assert is_question_dialog(utterance)


def test_switchboard_teacher_differs_from_dialog_on_backchannels_only():
    assert is_question_dialog("Oh, really?") and not question.is_question_switchboard("Oh, really?")
    assert question.question_label_fn("switchboard")("Really ?") == 0
    assert question.question_label_fn("dialog")("Really ?") == 1
    assert question.QuestionArguments(question_teacher="switchboard").question_teacher == "switchboard"
    assert set(question.RULES) == {"heuristic", "dialog", "switchboard", "qmark_or_what_how"}


def test_question_label_fn_rejects_unknown_teacher():
    assert question.question_label_fn("dialog")("Shall we dance ?") == 0
    assert question.question_label_fn("heuristic")("Shall we dance ?") == 1
    with pytest.raises(ValueError, match="Unknown question_teacher 'oracle'; choose from"):
        question.question_label_fn("oracle")


# ---- augmentations: deterministic with a seed, labels kept from the original text ----

POOL = ["a fine film .", "what is a film ?", "great fun !", "is it good ?", "the cast is strong .", "who wrote it ?"]
POOL_LABELS = [0, 1, 0, 1, 0, 1]


def test_combine_sentences_is_seeded_and_labels_are_the_max_of_the_parts():
    texts, labels = combine_sentences(POOL, POOL_LABELS, prob=1.0, seed=3)
    assert (texts, labels) == combine_sentences(POOL, POOL_LABELS, prob=1.0, seed=3)
    assert texts != combine_sentences(POOL, POOL_LABELS, prob=1.0, seed=4)[0]
    original = dict(zip(POOL, POOL_LABELS))
    for i, (text, label) in enumerate(zip(texts, labels)):
        parts = [p for p in POOL if p in text]
        assert POOL[i] in parts and len(parts) == 2, text
        assert label == max(original[p] for p in parts)
    assert combine_sentences(POOL, POOL_LABELS, prob=0.0, seed=3) == (POOL, POOL_LABELS)


def test_combine_sentences_closes_an_unpunctuated_first_part():
    texts, labels = combine_sentences(["so good", "is it on tonight ?"], [0, 1], prob=1.0, seed=0)
    assert set(texts) <= {"so good . is it on tonight ?", "is it on tonight ? so good"}
    assert labels == [1, 1]


def test_strip_period_touches_only_statements_and_is_seeded():
    texts = augment_questions(POOL, POOL_LABELS, strip_prob=0.0, lower_prob=0.0, seed=0, period_prob=1.0)
    assert texts == ["a fine film", "what is a film ?", "great fun", "is it good ?", "the cast is strong", "who wrote it ?"]
    half = augment_questions(POOL * 20, POOL_LABELS * 20, 0.0, 0.0, seed=1, period_prob=0.5)
    assert half == augment_questions(POOL * 20, POOL_LABELS * 20, 0.0, 0.0, seed=1, period_prob=0.5)
    stripped = sum(not t.endswith((".", "!")) for t, y in zip(half, POOL_LABELS * 20) if y == 0)
    assert 10 < stripped < 50  # about half of the 60 statements


def test_strip_period_off_leaves_the_existing_noise_unchanged():
    before = augment_questions(POOL * 5, POOL_LABELS * 5, strip_prob=0.5, lower_prob=0.3, seed=7)
    assert before == augment_questions(POOL * 5, POOL_LABELS * 5, 0.5, 0.3, seed=7, period_prob=0.0)


def test_backchannels_carry_the_teachers_convention():
    for teacher, asks in (("dialog", 1), ("switchboard", 0)):
        label_fn = question.question_label_fn(teacher)
        texts, labels = question.backchannels(200, label_fn, seed=0)
        assert (texts, labels) == question.backchannels(200, label_fn, seed=0)
        assert texts != question.backchannels(200, label_fn, seed=1)[0]
        assert len(texts) == 200 and set(texts) <= set(question.BACKCHANNELS)
        by_text = dict(zip(texts, labels))
        assert by_text["really ?"] == by_text["oh , yeah ?"] == asks  # where the conventions part
        assert by_text["uh-huh ."] == by_text["right ."] == 0  # a statement in both
    assert question.backchannels(0, label_fn, seed=0) == ([], [])


def test_backchannel_rows_reach_the_training_rows_only(tiny_data_dir, tiny_tokenizer, caplog):
    with caplog.at_level("WARNING", logger="question"):
        plain = _build(tiny_data_dir, tiny_tokenizer, question_teacher="switchboard")
    # Without backchannel rows the switchboard teacher labels SST-2/TREC as dialog does: the user is told.
    assert "question_backchannel_rows 0" in caplog.text and "--question_backchannel_rows 150" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="question"):
        more = _build(tiny_data_dir, tiny_tokenizer, question_teacher="switchboard", question_backchannel_rows=30)
        _build(tiny_data_dir, tiny_tokenizer, question_teacher="dialog")
    assert "question_backchannel_rows" not in caplog.text
    assert more.task_sizes[0] == plain.task_sizes[0] + 30
    assert more.eval_texts["question"] == plain.eval_texts["question"]
    for name in ("question", "question_gold", "question_swda_noqm"):
        assert more.eval_sets[name]["labels"] == plain.eval_sets[name]["labels"], name


def test_how_to_verb_phrases():
    trec = ["How can I find a list of  books ?", "How do you make a paintball ?", "What is a film ?",
            "How can I find a list of books ?"]
    assert how_to_verb_phrases(trec) == ["find a list of books", "make a paintball"]


def test_rephrased_rows_are_labelled_by_the_teacher_and_seeded():
    label_fn = question.question_label_fn("dialog")
    texts, labels = rephrase_questions(["make a paintball", "find a list of books"], 60, label_fn, seed=0)
    assert (texts, labels) == rephrase_questions(["make a paintball", "find a list of books"], 60, label_fn, seed=0)
    assert len(texts) == 60 and labels == [label_fn(t) for t in texts]
    assert 0 < sum(labels) < 60  # questions and non-questions from the same verb phrases
    filled = {
        (t.format(vp=vp)[0].upper() + t.format(vp=vp)[1:])
        for kind in question.REPHRASE_TEMPLATES.values()
        for t in kind
        if "{np}" not in t  # no noun phrases given: those templates are skipped
        for vp in ("make a paintball", "find a list of books")
    }
    assert set(texts) <= filled
    with_nouns, _ = rephrase_questions(["make a paintball"], 200, label_fn, seed=0, noun_phrases=["the menu"])
    assert any("the menu" in t for t in with_nouns) and any("make a paintball" in t for t in with_nouns)
    assert rephrase_questions([], 10, label_fn, seed=0) == ([], [])


def test_rephrased_rows_pair_each_request_opener_with_a_question_on_the_same_auxiliary():
    # "can you ...?" is a request under the dialog teacher, "can I / can it ...?" a question: without the pairs the
    # student reads every modal opening as a request ("Will that be all ?", "Can I help you ?")
    label_fn = question.question_label_fn("dialog")
    texts, labels = rephrase_questions(["make a paintball"], 2000, label_fn, seed=0, noun_phrases=["the menu"])
    by_opening = {}
    for text, label in zip(texts, labels):
        by_opening.setdefault(text.split()[0].lower(), set()).add(label)
    for auxiliary in ("can", "could", "will", "would", "may"):
        assert by_opening[auxiliary] == {0, 1}, auxiliary
    assert {"Why ?", "How about you ?", "Will that be all ?", "May I help you ?"} <= set(texts)  # the slot-free dialogue turns
    assert all(label_fn(t) == label for t, label in zip(texts, labels))


@pytest.mark.parametrize("teacher", ["dialog", "switchboard", "heuristic"])
def test_rephrased_statements_with_a_wh_word_inside_are_statements_to_every_teacher(teacher):
    # Joined rows ("... . Who is ... ?") put wh-words mid-turn in questions; these rows put them in statements
    # ("I have a friend who ...", "what I want is ..."). Each teacher still labels them itself.
    label_fn = question.question_label_fn(teacher)
    texts, labels = rephrase_questions(["make a paintball"], 1000, label_fn, seed=0, noun_phrases=["the menu"])
    filled = (t.format(vp="make a paintball", np="the menu") for t in question.REPHRASE_TEMPLATES["embedded"])
    embedded = {text[0].upper() + text[1:] for text in filled}
    drawn = [(t, label) for t, label in zip(texts, labels) if t in embedded]
    assert 150 < len(drawn) < 250  # one kind of five, drawn evenly
    assert {t for t, _ in drawn} == embedded and not any(label for _, label in drawn)
    assert all(set(question._TOKEN.findall(t.lower())) & question.WH_WORDS for t in embedded)


def test_rephrased_agreement_tags_and_hedges_follow_the_teacher():
    # Directives closed by ", OK ?": statements to the dialog teachers, questions to the plain heuristic (its '?'),
    # so the rows carry whichever convention is chosen; the same words closed by ", right ?" stay a question.
    tagged = [t for t in question.REPHRASE_TEMPLATES["statement"] if t.endswith("?")]
    assert len(tagged) >= 3 and all(question._AGREEMENT_TAG.search(t) for t in tagged)
    filled = [t.format(vp="make a paintball", np="the menu") for t in tagged]
    for teacher, expected in (("dialog", 0), ("switchboard", 0), ("heuristic", 1)):
        label_fn = question.question_label_fn(teacher)
        assert [label_fn(t) for t in filled] == [expected] * len(filled), teacher
    assert is_question_dialog("you make a paintball , right ?")
    # "how shall I say it" mid-statement: a hedge, which no teacher calls a question
    hedged = [t for t in question.REPHRASE_TEMPLATES["embedded"] if "say it" in t or "put it" in t]
    assert len(hedged) == 2
    for teacher in ("dialog", "switchboard", "heuristic"):
        label_fn = question.question_label_fn(teacher)
        assert not any(label_fn(t.format(vp="make a paintball", np="the menu")) for t in hedged), teacher


def test_rephrased_right_is_a_question_only_as_a_tag():
    # "you ... , right ?" asks, and loses its '?' to the noise with its label kept; without the answer "right ."
    # beside it, a student learns "right" as a question word (Switchboard has 77 "Right." turns, none a question).
    statements = question.REPHRASE_TEMPLATES["statement"]
    answers = [t for t in statements if t.split()[0] in ("right", "that's") and "right" in t]
    assert len(answers) == 3 and "you {vp} , right ?" in question.REPHRASE_TEMPLATES["question"]
    for teacher in ("dialog", "switchboard", "heuristic"):
        label_fn = question.question_label_fn(teacher)
        assert not any(label_fn(t.format(vp="make a paintball")) for t in answers), teacher
        assert label_fn("you make a paintball , right ?"), teacher


def test_rephrased_indirect_requests_and_wh_offers_follow_the_teacher():
    # "can you tell me where ... is ?" holds a wh-word and asks for something: a request under the dialogue
    # conventions, a question to the plain heuristic (its '?'). "what would you like ...?" opens like the request
    # "would you like ...?" after a wh-word, and "can I help you ?" like "can I have ...?": questions to every teacher.
    fill = dict(vp="make a paintball", np="the menu")
    requests = [
        t for t in question.REPHRASE_TEMPLATES["request"]
        if (" tell me " in t or t.startswith("may I ask")) and set(question._TOKEN.findall(t)) & question.WH_WORDS
    ]
    offers = [t for t in question.REPHRASE_TEMPLATES["question"] if "would you like" in t or t == "can I help you ?"]
    assert len(requests) == 4 and len(offers) == 3
    for teacher, request_label in (("dialog", 0), ("switchboard", 0), ("heuristic", 1)):
        label_fn = question.question_label_fn(teacher)
        assert [label_fn(t.format(**fill)) for t in requests] == [request_label] * len(requests), teacher
        assert all(label_fn(t.format(**fill)) for t in offers), teacher


def test_what_is_noun_phrases():
    trec = ["What is the capital of France ?", "Who was Galileo ?", "What is the name of the longest river in the "
            "whole wide world ?", "How far is it ?"]
    assert question.what_is_noun_phrases(trec) == ["the capital of France", "Galileo"]


def test_mined_traps_open_like_questions_but_are_statements():
    label_fn = question.question_label_fn("dialog")
    texts = ["what a film !", "is worth your time", "is it worth your time", "when it ends , you sigh .",
             "a fine film .", "what is it ?", "how clever"]
    traps, labels = mine_traps(texts, 10, label_fn, seed=0, exclude=["how clever"])
    assert sorted(traps) == ["is worth your time", "what a film !", "when it ends , you sigh ."]
    assert labels == [0, 0, 0]
    two, _ = mine_traps(texts, 2, label_fn, seed=0)
    assert len(two) == 2 and two == mine_traps(texts, 2, label_fn, seed=0)[0]
    assert any(t.startswith("is") for t in two)  # one of each opening kind when both exist


# ---- build_data and the arguments ----


def _build(data_dir, tokenizer, max_seq_length=32, **question_options):
    """The question task's data as train.py builds it: its options travel in the task's pool."""
    options = dict(question_pool_per_source=100, question_holdout_fraction=0.2, **question_options)
    pool = question.QuestionPool(QuestionArguments(**options))
    tasks = mtdata.get_tasks(["question"], pools={"question": pool})
    args = SimpleNamespace(
        data_dir=str(data_dir), max_seq_length=max_seq_length, max_train_samples=None, max_eval_samples=None,
        gold_eval=True,
    )
    return mtdata.build_data(tasks, tokenizer, args)


def test_build_data_with_dialog_teacher_and_extras(tiny_data_dir, tiny_tokenizer):
    plain = _build(tiny_data_dir, tiny_tokenizer, question_teacher="dialog")
    held = plain.eval_texts["question"]
    assert plain.eval_sets["question"]["labels"] == [int(is_question_dialog(t)) for t in held]
    extra = _build(tiny_data_dir, tiny_tokenizer, question_teacher="dialog", question_rephrase_rows=40, question_trap_rows=10)
    # 40 rephrased rows plus up to 10 mined traps (the tiny SST-2 slice holds some), training rows only: the
    # held-out split and the gold sets are the same as without them.
    assert 40 < extra.task_sizes[0] - plain.task_sizes[0] <= 50
    assert extra.eval_texts["question"] == held
    assert extra.eval_sets["question_gold"]["labels"] == plain.eval_sets["question_gold"]["labels"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("question_combine_prob", 1.0, "question_combine_prob must be in"),
        ("question_strip_period_prob", -0.1, "question_strip_period_prob must be in"),
        ("question_rephrase_rows", -1, "question_rephrase_rows must be a number of rows >= 0"),
        ("question_trap_rows", -5, "question_trap_rows must be a number of rows >= 0"),
        ("question_declarative_rows", -2, "question_declarative_rows must be a number of rows >= 0"),
        ("question_backchannel_rows", -3, "question_backchannel_rows must be a number of rows >= 0"),
    ],
)
def test_question_arguments_reject_bad_augmentation_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        QuestionArguments(**{field: value})


# ---- error analysis ----


def _load_errors_module():
    spec = importlib.util.spec_from_file_location("question_errors", ROOT / "bench" / "question_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_disagreement_groups():
    errors = _load_errors_module()
    gold = [1, 1, 0, 0, 1, 0]
    model = [1, 0, 0, 1, 1, 0]
    rule = [0, 1, 1, 1, 1, 0]
    assert errors.disagreements(gold, model, rule) == {"model_right": [0, 2], "rule_right": [1]}
    with pytest.raises(ValueError, match="differ in length: 2, 1, 1"):
        errors.disagreements([1, 0], [1], [0])


def test_error_report_on_a_tiny_model(make_model, tiny_tokenizer, tiny_data_dir, tmp_path, capsys):
    errors = _load_errors_module()
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path)
    text = errors.main([str(tmp_path), "--data_dir", str(tiny_data_dir), "--limit", "3"])
    assert capsys.readouterr().out.strip() == text.strip()

    # The printed counts are those of the grouping applied to the model's and the rule's own predictions.
    task = mtdata.TASKS["question"]
    for eval_source in task.eval:
        texts, gold = mtdata.read_source(eval_source.source, task, str(tiny_data_dir))
        predicted = errors.predict(model, tiny_tokenizer, texts)
        groups = errors.disagreements(gold, predicted, [int(question.is_question_heuristic(t)) for t in texts])
        section = text.split(f"== {eval_source.name} ")[1].split("\n\n")[0]
        assert f"{len(texts)} rows, {sum(gold)} gold questions" in section
        assert f"-- model right: {len(groups['model_right'])} rows" in section
        assert f"-- heuristic right: {len(groups['rule_right'])} rows" in section
        shown = [line for line in section.splitlines() if line.startswith("   [gold")]
        assert len(shown) == min(3, len(groups["model_right"])) + min(3, len(groups["rule_right"]))
    assert "(DailyDialog, every '?' removed)" in text and "(Switchboard, every '?' removed)" in text


def test_override_takes_the_second_rules_answer_only_where_the_rules_differ():
    errors = _load_errors_module()
    model, first, second = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]
    assert errors.override(model, first, second) == ([0, 1, 0, 0, 1], [0, 2])
    with pytest.raises(ValueError, match="differ in length: 2, 1, 1"):
        errors.override([1, 0], [1], [0])


def test_error_report_scores_each_model_under_the_other_convention(make_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    import shutil

    import numpy as np
    import pandas as pd
    import torch

    errors = _load_errors_module()
    data_dir = tmp_path / "data"  # the slices plus backchannels of both sets, where the conventions part
    shutil.copytree(tiny_data_dir, data_dir)
    for rel, extra in (
        ("dailydialog/validation.parquet", {"text": "Really ?", "act": 2, "is_question": 1, "dialog_id": 9, "turn": 0}),
        ("swda/validation.parquet", {"text": "Oh, really?", "tag": "bh", "is_question": 0}),
    ):
        frame = pd.read_parquet(data_dir / rel)
        pd.concat([frame, pd.DataFrame([extra] * 3).astype(frame.dtypes)]).to_parquet(data_dir / rel)
    folders = []
    for name, bias in (("plain", 0.0), ("leans_question", 0.3)):
        model = make_model()
        with torch.no_grad():
            model.heads["question"].bias[1] += bias
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        folders.append((str(tmp_path / name), model))
    args = [folder for folder, _ in folders] + ["--data_dir", str(data_dir), "--limit", "0", "--rule", "dialog"]
    text = errors.main(args + ["--override", "dialog", "switchboard"])
    assert "[gold" not in text  # --limit 0: counts only
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("\n\n")[-1].splitlines()[2:]]
    table = {(cells[0], cells[1]): cells[2:] for cells in rows}  # the closing table, past its header

    task = mtdata.TASKS["question"]
    differing = 0
    for eval_source in task.eval:
        texts, gold = mtdata.read_source(eval_source.source, task, str(data_dir))
        first, second = ([int(question.RULES[n](t)) for t in texts] for n in ("dialog", "switchboard"))
        differ = [i for i in range(len(texts)) if first[i] != second[i]]
        differing += len(differ)
        scores = []
        for folder, model in folders:
            predicted = list(errors.predict(model, tiny_tokenizer, texts))
            merged = [second[i] if i in differ else predicted[i] for i in range(len(texts))]
            scores.append(errors.question_class_scores(gold, merged)[0])
            assert table[(eval_source.name, folder)] == [
                f"{errors.question_class_scores(gold, predicted)[0]:.4f}",
                f"{len(differ)} ({sum(gold[i] for i in differ)})",
                str(sum(predicted[i] for i in differ)),
                f"{scores[-1]:.4f}",
            ]
        assert table[(eval_source.name, "**mean of 2**")][-1] == f"**{np.mean(scores):.4f}**"
    assert differing == 6  # the three backchannels of each set as written; without '?' the rules agree


def test_error_report_truncates_at_the_length_the_run_recorded(tmp_path):
    import json

    errors = _load_errors_module()
    assert errors.trained_length(tmp_path) == 128  # no metrics.json: a folder from elsewhere
    (tmp_path / "metrics.json").write_text(json.dumps({"recipe": {"max_seq_length": 64}}), encoding="utf-8")
    assert errors.trained_length(tmp_path) == 64  # so the F1 printed is the run's own
    (tmp_path / "metrics.json").write_text(json.dumps({"recipe": {}}), encoding="utf-8")
    assert errors.trained_length(tmp_path, default=96) == 96


def test_error_report_rejects_a_folder_without_model(tmp_path, tiny_data_dir):
    errors = _load_errors_module()
    with pytest.raises(ValueError, match="holds no config.json"):
        errors.main([str(tmp_path), "--data_dir", str(tiny_data_dir)])


@pytest.mark.parametrize(
    "option, message", [("--limit=-1", "--limit -1: pass 0 or more"), ("--max_length=0", "--max_length 0: pass a")]
)
def test_error_report_rejects_bad_numbers_before_loading(tmp_path, tiny_data_dir, capsys, option, message):
    errors = _load_errors_module()
    with pytest.raises(SystemExit):
        errors.main([str(tmp_path), "--data_dir", str(tiny_data_dir), option])
    assert message in capsys.readouterr().err


def test_declarative_questions_are_closed_statements_with_a_question_mark():
    label_fn = question.question_label_fn("dialog")
    texts = ["so you 're leaving .", "the film is good !", "high-minded snoozer", "what is it ?", "a fine cast ."]
    rows, labels = question.declarative_questions(texts, 10, label_fn, seed=0, exclude=["a fine cast ."])
    assert sorted(rows) == ["so you 're leaving ?", "the film is good ?"]
    assert labels == [label_fn(t) for t in rows] == [1, 1]
    assert question.declarative_questions(texts, 1, label_fn, seed=5) == question.declarative_questions(
        texts, 1, label_fn, seed=5
    )


def test_declarative_rows_keep_their_question_mark_under_noise(tiny_data_dir, tiny_tokenizer):
    qmark = tiny_tokenizer.convert_tokens_to_ids("?")
    # max_seq_length 128: a truncated row would lose its closing '?' (the tiny vocab spells rare words by letter).
    args = dict(question_teacher="dialog", question_strip_qmark_prob=0.99, max_seq_length=128)
    plain = _build(tiny_data_dir, tiny_tokenizer, **args)
    more = _build(tiny_data_dir, tiny_tokenizer, question_declarative_rows=30, **args)
    assert more.task_sizes[0] == plain.task_sizes[0] + 30
    with_qmark = [sum(qmark in ids for ids in mt.train["input_ids"]) for mt in (plain, more)]
    assert with_qmark[1] - with_qmark[0] == 30


def test_strip_qmark_takes_the_mark_from_requests_as_from_questions_and_keeps_each_label():
    # Unpunctuated speech drops the '?' of a request too: "can you pass the salt" must stay a request for the student.
    rows = ["can you pass the salt ?", "what is it ?", "a fine film ."] * 100
    labels = [0, 1, 0] * 100
    texts = augment_questions(rows, labels, strip_prob=0.5, lower_prob=0.0, seed=3)
    assert texts == augment_questions(rows, labels, strip_prob=0.5, lower_prob=0.0, seed=3)
    for original in ("can you pass the salt ?", "what is it ?"):
        noised = [t for t, r in zip(texts, rows) if r == original]
        assert set(noised) == {original, original.removesuffix(" ?")}
        assert 30 < sum("?" not in t for t in noised) < 70  # about half of the 100
    assert all(t == "a fine film ." for t, r in zip(texts, rows) if r == "a fine film .")  # nothing to strip
