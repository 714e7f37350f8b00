"""Question detection: the weak labels of the `question` task.

- The rules: `is_question_heuristic` (the plain teacher), `is_question_dialog` (the dialog-act teacher, the
  recipe's default) and `reference_rule_wh_or_qmark` (the data README's reference rule), in one registry
  `RULES` whose names are used everywhere: `--question_teacher`, metrics.json, the model card, bench/.
- `QuestionArguments`: every `question_*` option of train.py.
- `QuestionPool`: the per-task hook that `data.build_data` calls for the question task: how many rows each
  text source gives, the hold-out share, and the training rows made from the pool (traps, rephrasings,
  combined turns, noise, declarative questions), all labelled by the teacher, never by gold.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------

WH_WORDS = frozenset("what how why who whom whose where when which".split())
AUXILIARIES = frozenset(
    "is are am was were do does did can could will would shall should may might must have has had "
    "isn't aren't wasn't weren't don't doesn't didn't can't couldn't won't wouldn't shouldn't haven't hasn't "
    "hadn't mustn't ca wo".split()  # "ca n't" / "wo n't" as SST-2 and DailyDialog tokenize them
)
# "what a film !", "how nice of you ." : wh-word + these opens an exclamation, not a question.
_EXCLAMATIVE_NEXT = frozenset("a an".split())
_TOKEN = re.compile(r"[a-z']+")


def is_question_heuristic(text: str) -> bool:
    """The weak labeller: a sentence is a question if it ends with `?`, or if it opens with a wh-word or an
    auxiliary verb and is not closed as a statement or exclamation.

    Refinements over the plain rule (each one pinned by tests/test_data.py):
    - a final `?` (ignoring closing quotes/brackets) always wins;
    - "what a ..."/"what an ..." open exclamations ("what a film !");
    - a sentence ending in `!` is an exclamation ("how nice !");
    - a wh-opening that ends in `.` is a statement ("when it ends , you sigh .", "what i liked was the cast .");
    - a wh-word followed by a comma is an interjection, not a question ("well , what , it 's fine .").
    """
    stripped = text.strip().rstrip("\"')]} ")
    if not stripped:
        return False
    if stripped.endswith("?"):
        return True
    words = _TOKEN.findall(stripped.lower())
    if not words:
        return False
    first = words[0]
    if first not in WH_WORDS and first not in AUXILIARIES:
        return False
    if stripped.endswith("!"):
        return False
    if first in WH_WORDS:
        if len(words) > 1 and words[1] in _EXCLAMATIVE_NEXT:
            return False
        if stripped.endswith("."):
            return False
    return True


def reference_rule_wh_or_qmark(text: str) -> bool:
    """The simplest rule quoted in the data README: ends with `?` or starts with what/how.

    Read as a raw string prefix ("however" counts), which reproduces the README's reference F1 (0.854 as
    written, 0.350 with `?` removed, on DailyDialog validation).
    """
    stripped = text.strip()
    return stripped.endswith("?") or stripped.lower().startswith(("what", "how"))


# The dialog teacher (`question_teacher: dialog`): DailyDialog-style dialog acts, where a question asks for
# information and a request or suggestion phrased as a question ("can you help me ?") is a directive.
_LEAD_WORDS = frozenset(
    "well oh so ok okay yes yeah no nope and but or then now hi hello hey excuse me sorry um mmm mmmm er ah uh "
    "right sir madam really listen look actually anyway alright all dear honey".split()
)
# After an auxiliary, one of these makes a yes/no question ("is there ...", "don't you ..."); anything else is a
# fragment or an imperative ("is pretty funny", "don't worry", "have a nice day").
_SUBJECTS = frozenset(
    "i you he she it we they there this that these those anyone anybody someone somebody everyone everybody "
    "anything something everything nobody your my his her our their its".split()
)
_REQUEST_OPENERS = tuple(
    tuple(opener.split())
    for opener in (
        "can you", "could you", "would you", "will you", "won't you", "can we", "could we", "could i",
        "shall we", "shall i", "why don't", "why not", "how about", "may i", "do you mind", "can i have",
    )
)
# A wh-word directly before one of these opens a subordinate or relative clause, not a question: "when we bought
# the car , ...", "which I had done", "what I see is ...". A question puts an auxiliary or a noun there ("when did
# you", "which one"); "how you doing ?" still counts through its '?'.
_CLAUSE_SUBJECTS = frozenset("i you he she it we they ours yours mine theirs".split())
# After the first comma clause these open a relative clause ("a friend who , who works with ...") unless an
# auxiliary follows ("..., where is the bank").
_RELATIVE_WORDS = frozenset("who whom whose which where when".split())
# "how nice of you" opens an exclamation; "how much", "how long" open questions.
_EXCLAMATIVE_HOW = frozenset(
    "nice wonderful great lovely beautiful sweet kind terrible awful funny interesting strange sad exciting "
    "stupid silly cute cool amazing romantic clever rude thoughtful generous marvelous".split()
)
# A question that is quoted or reported is not asked of the listener: "and I'm like , well , why can't she come",
# "and then you go , what ?", "he said , 'do you want me to help you ?'". A reporting frame is a subject (or its
# contraction with a form of be) and one of these verbs, where nothing before it asks a question; a bare subject and
# verb ("he said", "you go") only where they open the sentence.
_REPORTING_VERBS = frozenset("said says asked asks like goes go went going".split())
_REPORTERS = frozenset("i you he she it we they people everybody everyone somebody someone".split())
_REPORTER_CONTRACTIONS = frozenset("i'm you're he's she's it's we're they're".split())
_BE = frozenset("is am are was were".split())
# A directive that asks for agreement is a directive: "wait a minute , OK ?" ("..., right ?" is a question).
_AGREEMENT_TAG = re.compile(r",\s*(?:ok|okay|all right|alright)\s*\??\s*$", re.IGNORECASE)
# A speaker looking for words: "how shall I say it ," ends no question.
_HEDGES = frozenset(("how", modal, "i", verb, "it") for modal in ("shall", "should", "can") for verb in ("say", "put"))
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
# The period of a title or of "a.m." ends no sentence: "May I speak to Mr . Smith ?" is one request, not a request
# and the declarative question "Smith ?".
_ABBREVIATION = re.compile(r"\b(?:(mr|mrs|ms|dr|prof|st)|(?<![\w.])([ap]) ?\. ?m)\s?\.", re.IGNORECASE)


def _unabbreviate(text: str) -> str:
    return _ABBREVIATION.sub(lambda m: m[1] or m[2] + "m", text)


_APOSTROPHE = re.compile(r"(\w) ?['’] ?(t|s|re|ve|ll|d|m)\b")  # "don ' t" / "don ’ t" -> "don't"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|n't")


def _words(clause: str) -> list[str]:
    words: list[str] = []
    for word in _WORD.findall(_APOSTROPHE.sub(r"\1'\2", clause.lower())):
        if word == "n't" and words:  # "do n't" / "ca n't" as SST-2 and DailyDialog tokenize them
            words[-1] = {"ca": "can", "wo": "won"}.get(words[-1], words[-1]) + "n't"
        else:
            words.append(word)
    return _skip_lead_words(words)


def _skip_lead_words(words: list[str]) -> list[str]:
    """Without the leading discourse words: "well , how long ..." is a how-question (a lone word is kept)."""
    start = 0
    while start < len(words) - 1 and words[start] in _LEAD_WORDS:
        start += 1
    return words[start:]


def _clause_kind(words: list[str], later: bool = False) -> str:
    """'request', 'question' or 'other', from the opening words of one comma-separated clause (`later`: not the
    sentence's first clause)."""
    if tuple(words) in _HEDGES:
        return "other"
    if words[:3] in (["how", "about", "you"], ["how", "about", "yourself"]):
        return "question"  # "how about you ?" hands the question back; "how about a walk ?" suggests
    if words[:3] == ["may", "i", "help"]:
        return "question"  # an offer of service, like "can I help you ?"; "may I see your ID ?" asks for something
    if any(tuple(words[: len(opener)]) == opener for opener in _REQUEST_OPENERS):
        return "request"
    if not words:
        return "other"
    first, second = words[0], (words[1] if len(words) > 1 else "")
    contracted = "'" in first and first.split("'")[0] in WH_WORDS  # "what's the problem", "how's it going"
    if contracted:
        first = first.split("'")[0]
    if first in WH_WORDS:
        if second in _EXCLAMATIVE_NEXT or (first == "how" and second in _EXCLAMATIVE_HOW):
            return "other"
        if second in _CLAUSE_SUBJECTS and not contracted:
            return "other"  # a subordinate clause: "when we bought it", "what I see"
        if later and first in _RELATIVE_WORDS and second not in AUXILIARIES:
            return "other"  # a relative clause: "..., who works with"
        return "question"
    if (first in AUXILIARIES or first.endswith("n't")) and second in _SUBJECTS:
        return "question"
    return "other"


def _reports_a_question(words: list[str]) -> bool:
    """Do these words (one sentence) report a question rather than ask one: a reporting frame ("she's like",
    "he said", "you go") with nothing asked before it, followed by a question or request opening?"""
    for i in range(1, len(words)):
        verb, before = words[i], words[i - 1]
        if verb not in _REPORTING_VERBS:
            continue
        framed = before in _REPORTER_CONTRACTIONS or (before in _BE and i >= 2 and words[i - 2] in _REPORTERS)
        if not framed and (verb == "like" or before not in _REPORTERS or i > 1):
            continue  # "I like what I see"; a bare "you go" only opens the sentence: not "if you go , where ..."
        if _clause_kind(words[: i + 1]) != "other":
            return False  # the sentence asks before anything is reported: "where do you go , what ..."
        rest = _skip_lead_words(words[i + 1 :])
        if rest and _clause_kind(rest) != "other":
            return True
    return False


def _sentence_is_question(sentence: str) -> bool:
    stripped = sentence.strip().rstrip("\"')]} ")
    if not stripped:
        return False
    ends_with_qmark = stripped.endswith("?")
    if not ends_with_qmark and stripped[-1] in ".!":
        return False  # closed as a statement or an exclamation, whatever its opening
    asks = ends_with_qmark  # "you did what ?": a declarative question, unless a clause opening decides
    for position, clause in enumerate(stripped.split(",")):
        kind = _clause_kind(_words(clause), later=position > 0)
        if kind != "other":  # the first clause with a question or request opening decides
            asks = kind == "question"
            break
    # what would ask is still a directive or a report: "wait a minute , OK ?", "and I'm like , why ..."
    return asks and not (_AGREEMENT_TAG.search(stripped) or _reports_a_question(_words(stripped)))


def is_question_dialog(text: str) -> bool:
    """The dialog teacher: is this utterance (one or more sentences) a question, in the sense of a dialog act?

    Refinements over `is_question_heuristic`, for conversational text (each pinned by tests/test_question.py):
    - an utterance is a question if any of its sentences is ("Good morning , sir . Is there a bank near here ?");
    - leading discourse words are skipped ("well , how far is it"), and a later comma clause can open the
      question ("if I buy two , can I get a discount");
    - a request or suggestion phrased as a question is a directive, not a question: "can you / could you /
      would you / will you ...", "shall we", "why don't we", "how about", "may I", "can I have";
    - an offer of service is a question: "may I help you ?", as "can I help you ?";
    - an auxiliary opens a question only before a subject ("is there", "don't you"), not in fragments or
      imperatives ("is pretty funny", "don't worry");
    - a sentence closed by `.` or `!` is a statement or exclamation, whatever its first word (the period of
      "Mr ." or "a . m ." closes no sentence);
    - a wh-word before a subject pronoun opens a subordinate clause ("when we bought it , ...", "what I see is"),
      and after the first comma who/which/where/when open a relative clause unless an auxiliary follows;
    - "how about you ?" is a question (it hands the question back), unlike "how about a walk ?";
    - a reported or quoted question is not asked ("and I'm like , why can't she come", "he said , 'do you ...?'"),
      a directive closed by ", OK ?" / ", all right ?" stays a directive (", right ?" asks), and "how shall I say
      it" is a speaker looking for words.
    """
    return any(_sentence_is_question(s) for s in _SENTENCE.findall(_unabbreviate(text)))


# Backchannels phrased as questions: the listener's "really ?", "oh , yeah ?", "is that right ?", "what ?". The
# Switchboard act scheme (SWBD-DAMSL) tags them as backchannels (bh), not questions; DailyDialog's acts count them
# as questions.
_BACKCHANNEL = re.compile(
    r"^(?:(?:oh|uh|um|well|yeah|and)\s*,?\s+)*"
    r"(?:really|yeah|right|all right|huh|what|is it|is it really|is that right|is that so|is that true|you do|"
    r"you did|do you|did you|are you|you are|you have|oh)\s*\?\s*$",
    re.IGNORECASE,
)


def is_question_switchboard(text: str) -> bool:
    """The dialog teacher under the Switchboard convention: a backchannel phrased as a question ("really ?",
    "oh , is that right ?") is not a question; everything else as `is_question_dialog`."""
    return not _BACKCHANNEL.match(text.strip()) and is_question_dialog(text)



def strip_question_marks(text: str) -> str:
    """The unpunctuated view of a text: every `?` removed, spaces tidied."""
    return " ".join(text.replace("?", " ").split())


TEACHERS: dict[str, Callable[[str], bool]] = {
    "heuristic": is_question_heuristic,
    "dialog": is_question_dialog,
    "switchboard": is_question_switchboard,
}
# Every rule measured beside the model on the question eval sets: the teachers and the reference rule.
RULES: dict[str, Callable[[str], bool]] = {**TEACHERS, "qmark_or_what_how": reference_rule_wh_or_qmark}


def question_label_fn(teacher: str) -> Callable[[str], int]:
    if teacher not in TEACHERS:
        raise ValueError(f"Unknown question_teacher {teacher!r}; choose from {sorted(TEACHERS)}.")
    rule = TEACHERS[teacher]
    return lambda text: int(rule(text))


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class QuestionArguments:
    question_pool_per_source: int | None = field(
        default=6000, metadata={"help": "Rows taken from each text source of the question pool (SST-2, TREC)."}
    )
    question_holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the question pool held out as its validation split."}
    )
    question_strip_qmark_prob: float = field(
        default=0.0,
        metadata={"help": "Share of training rows with a '?' (questions, requests) whose '?' is removed (label kept)."},
    )
    question_lowercase_prob: float = field(default=0.0, metadata={"help": "Share of training texts lowercased."})
    question_teacher: Literal["heuristic", "dialog", "switchboard"] = field(
        default="heuristic",
        metadata={
            "help": "Weak labeller of the question pool, which also sets the question convention: heuristic "
            "(question.is_question_heuristic), dialog (question.is_question_dialog, DailyDialog's acts: per "
            "utterance, requests such as 'can you ...?' are directives, 'really ?' is a question) or switchboard "
            "(question.is_question_switchboard, Switchboard's acts: as dialog, but backchannels such as "
            "'really ?' are not questions)."
        },
    )
    question_trap_rows: int = field(
        default=0, metadata={"help": "Extra rows that open like a question but the teacher calls statements."}
    )
    question_rephrase_rows: int = field(
        default=0,
        metadata={
            "help": "Extra rows of dialogue forms (questions and short turns, yes/no questions, requests, statements "
            "and answers, statements with a wh-word inside; question.REPHRASE_TEMPLATES) filled with TREC phrases."
        },
    )
    question_declarative_rows: int = field(
        default=0, metadata={"help": "Extra rows of source statements closed with '?' (declarative questions)."}
    )
    question_backchannel_rows: int = field(
        default=0,
        metadata={
            "help": "Extra rows of backchannels ('really ?', 'oh , yeah ?', 'uh-huh .'), labelled by the teacher: "
            "the rows through which the teacher's convention for them reaches the student (dialog: a question, "
            "switchboard: not a question)."
        },
    )
    question_combine_prob: float = field(
        default=0.0, metadata={"help": "Share of training rows joined with another row into a two-sentence turn."}
    )
    question_strip_period_prob: float = field(
        default=0.0, metadata={"help": "Share of training statements whose closing '.' or '!' is removed."}
    )

    def __post_init__(self):
        if self.question_pool_per_source is not None and self.question_pool_per_source <= 0:
            raise ValueError(
                f"question_pool_per_source must be a positive number of rows or null, got "
                f"{self.question_pool_per_source}."
            )
        for name in (
            "question_trap_rows",
            "question_rephrase_rows",
            "question_declarative_rows",
            "question_backchannel_rows",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number of rows >= 0, got {getattr(self, name)}.")
        for name in (
            "question_holdout_fraction",
            "question_strip_qmark_prob",
            "question_lowercase_prob",
            "question_combine_prob",
            "question_strip_period_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        question_label_fn(self.question_teacher)


# ---------------------------------------------------------------------------------------------------------
# Training rows made from the pool
# ---------------------------------------------------------------------------------------------------------

def augment_questions(
    texts: list[str], labels: list[int], strip_prob: float, lower_prob: float, seed: int, period_prob: float = 0.0
):
    """Noise the training text of teacher-labelled rows so the student must learn syntax, not '?'.

    Labels are kept from the original text (the teacher saw the punctuation; the student does not always).
    `strip_prob` removes the '?' of any row that holds one, questions and requests alike ("can you pass the salt"
    stays a request without its mark).
    `period_prob` drops the closing `.`/`!` of statements, so that `.` is no cue either.
    """
    rng = np.random.default_rng(seed)
    out = []
    for text, label in zip(texts, labels):
        if "?" in text and strip_prob > 0 and rng.random() < strip_prob:
            text = strip_question_marks(text) or text
        if label == 0 and period_prob > 0 and rng.random() < period_prob:
            text = text.rstrip().rstrip(".!").rstrip() or text
        if lower_prob > 0 and rng.random() < lower_prob:
            text = text.lower()
        out.append(text)
    return out


# Sentence forms that TREC's factoid questions lack but dialogue is full of, filled with verb phrases taken from
# TREC's how-to questions and short noun phrases from its what/who-is questions; a template without a slot is used as
# it is. The teacher labels each result; the templates carry no label. `yes_no` pairs the request openers ("can you",
# "will you", "could I") with the same auxiliaries before other subjects ("can I", "will that", "could it") and with
# negated auxiliaries, `question` holds the short turns of dialogue ("why ?", "how about you ?") and offers of service
# ("may I help you ?"), and `statement` the answers that follow a question ("yes , I ...") and directives closed by
# ", OK ?": without them the student reads every modal opening as a request and every '?' as a question. `embedded`
# holds statements with a wh-word inside (relative clauses, indirect questions, "what I want is ...", "how shall I
# say it"), some with the fillers of speech: the sources' statements seldom have one, and joined rows ("... . Who is
# ... ?") would otherwise teach that a wh-word anywhere makes a question.
REPHRASE_TEMPLATES = {
    "question": (
        "do you {vp} ?", "did you {vp} ?", "have you ever tried to {vp} ?", "are you going to {vp} ?",
        "should we {vp} ?", "is it hard to {vp} ?", "when do you {vp} ?", "why do you want to {vp} ?",
        "do you have {np} ?", "is {np} included ?", "what about {np} ?", "did you see {np} ?", "where is {np} ?",
        "have you heard of {np} ?", "is that {np} ?", "can I get {np} ?", "may I help you ?",
        "may I help you with {np} ?", "why ?", "how much ?", "what for ?", "which one ?", "how come ?", "now what ?",
        "how about you ?", "what about you ?", "how much is {np} ?", "you {vp} , right ?",
        "what did he say about {np} ?", "what did you say ?", "can I help you ?", "what would you like ?",
        "what would you like to {vp} ?",
    ),
    "yes_no": (
        "can I {vp} ?", "can it {vp} ?", "will it be hard to {vp} ?", "will I need {np} ?", "will that be {np} ?",
        "will that be all ?", "could it be {np} ?", "would that be {np} ?", "can they {vp} ?",
        "don't you want to {vp} ?", "didn't you {vp} ?", "isn't that {np} ?", "won't it be {np} ?",
        "aren't you going to {vp} ?", "doesn't it {vp} ?",
    ),
    "request": (
        "can you {vp} ?", "could you {vp} for me ?", "would you {vp} , please ?", "will you {vp} ?",
        "shall we {vp} ?", "why don't we {vp} ?", "how about we {vp} ?", "may I {vp} ?", "would you like to {vp} ?",
        "how about {np} ?", "would you like {np} ?", "could you show me {np} ?", "can you get me {np} ?",
        "may I have {np} ?", "can I have {np} ?", "why not {np} ?", "why not ?", "can we {vp} ?", "could I {vp} ?",
        "do you mind if I {vp} ?", "could you tell me {np} ?", "can you help me {vp} ?",
        "could you help me with {np} ?", "can you tell me where {np} is ?", "could you tell me what {np} is ?",
        "can you tell me how to {vp} ?", "may I ask what {np} is ?",
    ),
    "statement": (
        "I want to {vp} .", "we should {vp} .", "let's {vp} .", "you need to {vp} .", "I'd like to {vp} .",
        "I don't know how to {vp} .", "please {vp} .", "don't {vp} .", "I can {vp} .", "it will be hard to {vp} .",
        "I'd like {np} .", "here is {np} .", "that's {np} .", "I have {np} .", "we need {np} .", "{np} , please .",
        "that would be {np} .", "it could be {np} .", "yes , I {vp} .", "yes , you can {vp} .", "no , it won't .",
        "yes , that's {np} .", "no , we don't have {np} .", "yes , of course .", "thanks for your help .",
        "let me help you with {np} .", "please {vp} , OK ?", "let's {vp} , all right ?", "just {vp} , okay ?",
        "right .", "that's right .", "right , I {vp} .",
    ),
    "embedded": (
        "I don't know what {np} is .", "I wonder who {np} is .", "I asked him what {np} was .",
        "I know people who {vp} .", "I have a friend who , uh , tried to {vp} .", "we met a couple who wanted to {vp} .",
        "it was my brother who wanted to {vp} .", "that's why I want to {vp} .", "which is why we {vp} .",
        "which is {np} , I guess .", "what I want is {np} .", "what I'd like to do is {vp} .",
        "I don't know how they {vp} .", "it depends on where you {vp} .", "I remember when we used to {vp} .",
        "you know , that's what they do .", "I mean , when I was young , we used to {vp} .",
        "so , uh , what I've seen is {np} .", "it was , uh , how shall I say it , {np} .",
        "so , uh , how should I put it , we used to {vp} .",
    ),
}
_HOW_TO = re.compile(
    r"^(?:how|where|when|why) (?:do|can|could|should|would) (?:i|you|we|one|people) (?P<vp>[^?]+?) ?\?$",
    re.IGNORECASE,
)
_WHAT_IS = re.compile(r"^(?:what|who) (?:is|are|was|were) (?P<np>[^?]+?) ?\?$", re.IGNORECASE)


def how_to_verb_phrases(texts: Sequence[str]) -> list[str]:
    """'How can I find a list of books ?' -> 'find a list of books' (unique, in order of first appearance)."""
    phrases = (" ".join(m["vp"].split()) for t in texts if (m := _HOW_TO.match(t.strip())))
    return list(dict.fromkeys(p for p in phrases if p))


def what_is_noun_phrases(texts: Sequence[str], max_words: int = 6) -> list[str]:
    """'What is the capital of France ?' -> 'the capital of France' (short ones only: dialogue turns are short)."""
    phrases = (" ".join(m["np"].split()) for t in texts if (m := _WHAT_IS.match(t.strip())))
    return list(dict.fromkeys(p for p in phrases if p and len(p.split()) <= max_words))


def _slot(template: str) -> str | None:
    return "vp" if "{vp}" in template else "np" if "{np}" in template else None


def rephrase_questions(
    verb_phrases: Sequence[str],
    n: int,
    label_fn: Callable[[str], int],
    seed: int,
    noun_phrases: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """`n` sentences from REPHRASE_TEMPLATES (kinds drawn evenly) filled with the given phrases, each labelled by
    `label_fn`. Templates whose slot has no phrases are skipped; none are made without any phrases."""
    fillers = {"vp": list(verb_phrases), "np": list(noun_phrases)}
    if n <= 0 or not (verb_phrases or noun_phrases):
        return [], []
    usable = {
        kind: [t for t in templates if _slot(t) is None or fillers[_slot(t)]]
        for kind, templates in REPHRASE_TEMPLATES.items()
    }
    usable = {kind: templates for kind, templates in usable.items() if templates}
    rng = np.random.default_rng(seed)
    kinds = list(usable)
    texts = []
    for _ in range(n):
        templates = usable[kinds[rng.integers(len(kinds))]]
        template = templates[rng.integers(len(templates))]
        slot = _slot(template)
        text = template if slot is None else template.format(**{slot: fillers[slot][rng.integers(len(fillers[slot]))]})
        texts.append(text[0].upper() + text[1:])
    return texts, [int(label_fn(t)) for t in texts]


def mine_traps(
    texts: Sequence[str], n: int, label_fn: Callable[[str], int], seed: int, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """Up to `n` texts that open like a question (a wh-word or an auxiliary first) but that the teacher labels
    a statement: "what a film !", "when it ends , you sigh .", "is pretty funny". The plain student learns
    "wh-word first = question"; these rows say otherwise."""
    if n <= 0:
        return [], []
    skip = set(exclude)
    by_opening: dict[str, list[str]] = {"wh": [], "aux": []}
    for text in texts:
        words = _TOKEN.findall(text.lower())
        opening = "wh" if words and words[0] in WH_WORDS else "aux" if words and words[0] in AUXILIARIES else None
        if opening and text not in skip and not label_fn(text):
            by_opening[opening].append(text)
    # Half of each kind where possible: aux-first fragments ("is worth your time") far outnumber wh-first traps.
    rng = np.random.default_rng(seed)
    wh, aux = by_opening["wh"], by_opening["aux"]
    n_wh = min(len(wh), max(n // 2, n - len(aux)))
    traps = [wh[i] for i in np.sort(rng.permutation(len(wh))[:n_wh])]
    traps += [aux[i] for i in np.sort(rng.permutation(len(aux))[: n - n_wh])]
    return traps, [0] * len(traps)


# Backchannels: the listener's short turns. Those phrased as questions are where the two conventions part:
# DailyDialog's acts call "really ?" a question, Switchboard's a backchannel (SWBD-DAMSL `bh`). Neither SST-2 nor
# TREC holds any, so without these rows every teacher gives the student the same labels.
BACKCHANNELS = (
    "really ?", "oh , really ?", "oh , yeah ?", "is that right ?", "is that so ?", "is it really ?", "you did ?",
    "huh ?", "what ?", "yeah .", "uh-huh .", "right .", "oh , i see .", "sure .", "okay .", "i know .", "exactly .",
    "oh , that 's nice .", "wow .", "that 's true .",
)


def backchannels(n: int, label_fn: Callable[[str], int], seed: int) -> tuple[list[str], list[int]]:
    """`n` backchannels drawn from BACKCHANNELS, each labelled by `label_fn`: the teacher's convention decides
    whether "really ?" is a question."""
    if n <= 0:
        return [], []
    rng = np.random.default_rng([seed, 2])  # a stream of its own: the other rows' draws stay as they were
    texts = [BACKCHANNELS[i] for i in rng.integers(len(BACKCHANNELS), size=n)]
    return texts, [int(label_fn(t)) for t in texts]


def declarative_questions(
    texts: Sequence[str], n: int, label_fn: Callable[[str], int], seed: int, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """Up to `n` statements of the sources turned into declarative questions by closing them with `?` instead
    of `.`/`!` ("so you 're leaving ?"), labelled by the teacher. TREC questions all open with a wh-word, so
    without these rows the student never sees a question that only its `?` marks."""
    if n <= 0:
        return [], []
    skip = set(exclude)
    # Closed sentences only: SST-2 also holds phrases ("high-minded snoozer"), which make poor questions.
    statements = [
        t for t in texts if t.rstrip().endswith((".", "!")) and "?" not in t and t not in skip and not label_fn(t)
    ]
    keep = np.sort(np.random.default_rng(seed).permutation(len(statements))[:n])
    out = [statements[i].rstrip().rstrip(".!").rstrip() + " ?" for i in keep]
    return out, [int(label_fn(t)) for t in out]


def combine_sentences(
    texts: list[str], labels: list[int], prob: float, seed: int
) -> tuple[list[str], list[int]]:
    """With probability `prob`, join a row with a random other row of the pool (either order), as dialogue turns
    join sentences ("Well , that's too far . Can you change some money ?"). The label is the larger of the two
    original labels: an utterance is a question when one of its sentences is."""
    if prob <= 0 or len(texts) < 2:
        return texts, labels
    rng = np.random.default_rng(seed)
    out_texts, out_labels = [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        if rng.random() < prob:
            j = int(rng.integers(len(texts) - 1))
            j += j >= i  # any row but this one
            first, second = (i, j) if rng.random() < 0.5 else (j, i)
            head = texts[first].rstrip()
            if head[-1] not in ".!?":
                head += " ."
            text, label = f"{head} {texts[second].strip()}", max(label, labels[j])
        out_texts.append(text)
        out_labels.append(label)
    return out_texts, out_labels



@dataclass(frozen=True)
class QuestionPool:
    """The hook `data.build_data` calls for the question task (see `data.TaskSpec.pool`).

    The task's text sources are unlabelled; each gives `rows_per_source` rows to the pool, `holdout_fraction`
    of the pool is held out as the task's own validation split, and `training_rows` turns the rest into the
    training set. `source_texts` (every row of the sources) feeds the mined and rephrased rows; rows of the
    pool are never reused there."""

    args: QuestionArguments = field(default_factory=QuestionArguments)

    @property
    def label_fn(self) -> Callable[[str], int]:
        return question_label_fn(self.args.question_teacher)

    @property
    def rows_per_source(self) -> int | None:
        return self.args.question_pool_per_source

    @property
    def holdout_fraction(self) -> float:
        return self.args.question_holdout_fraction

    def training_rows(
        self, texts: list[str], labels: list[int], source_texts: Sequence[str], pool: Sequence[str], seed: int
    ) -> tuple[list[str], list[int]]:
        args, label_fn = self.args, self.label_fn
        if args.question_teacher == "switchboard" and args.question_backchannel_rows == 0:
            logger.warning(
                "question_teacher switchboard with question_backchannel_rows 0: SST-2 and TREC hold no backchannel, "
                "so this teacher labels every training row as dialog does and the student learns the DailyDialog "
                "convention. Add backchannel rows (--question_backchannel_rows 150) to teach Switchboard's."
            )
        traps = mine_traps(source_texts, args.question_trap_rows, label_fn, seed, exclude=pool)
        rephrased = rephrase_questions(
            how_to_verb_phrases(source_texts),
            args.question_rephrase_rows,
            label_fn,
            seed,
            noun_phrases=what_is_noun_phrases(source_texts),
        )
        texts, labels = texts + traps[0] + rephrased[0], labels + traps[1] + rephrased[1]
        texts, labels = combine_sentences(texts, labels, args.question_combine_prob, seed)
        texts = augment_questions(
            texts,
            labels,
            args.question_strip_qmark_prob,
            args.question_lowercase_prob,
            seed,
            period_prob=args.question_strip_period_prob,
        )
        # Added after the noise: removing their `?` would leave statements labelled as questions ("so you 're
        # leaving", "really" under the dialog convention).
        declarative = declarative_questions(
            source_texts, args.question_declarative_rows, label_fn, seed, exclude=pool
        )
        replies = backchannels(args.question_backchannel_rows, label_fn, seed)
        return texts + declarative[0] + replies[0], labels + declarative[1] + replies[1]


def rule_metrics(metric, texts_by_set: dict[str, list[str]], labels_by_set: dict[str, list[int]]) -> dict:
    """Each rule of `RULES` scored on each question eval set (the teachers beside the student)."""
    return {
        name: {
            rule: metric.compute(predictions=[int(fn(t)) for t in texts], references=labels_by_set[name])
            for rule, fn in RULES.items()
        }
        for name, texts in texts_by_set.items()
    }
