"""VQA answer normalisation as the official VQA evaluation (and EvalAI) defines it.

Two steps exist in the official pipeline and both are reproduced here:
- `normalize_vqa_answer` is the EvalAI answer processor that the reference applies to a
  prediction before writing the submission file;
- `process_punctuation` / `process_digit_article` are what the VQA server applies to the
  prediction and to the human answers when the human answers disagree.
The quirks of the official code are kept on purpose (see comments): they change scores.
"""
from __future__ import annotations

import re

# Apostrophe-less spellings the official code restores ("dont" -> "don't"). Written as
# "bare restored" pairs; the odd entry somebody'd -> somebodyd is in the official table.
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't
itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for line in _CONTRACTION_PAIRS.strip().splitlines() for pair in line.split("|")
)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!"]

# The official pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead
# that can never match at a ".", so it reduces to "a period not followed by a digit".
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The official call is sub("", text, re.UNICODE): re.UNICODE (32) lands in the `count`
# argument, so at most 32 periods are removed. Kept for exact scores.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation exactly as the official VQA evaluation does."""
    out = text
    # The decision looks at the original text, the replacement acts on the running one.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Number words to digits, drop articles, restore contractions (official order)."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer processor applied to a raw prediction before submission."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official VQA accuracy of one (already EvalAI-processed) prediction, in [0, 1].

    min(#other humans who gave it / 3, 1), averaged over the leave-one-out subsets of the
    human answers (10 choose 9 for VQAv2). Answers are normalised only when the humans
    disagree, as the official code does.
    """
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    # Leave-one-out by position: the official code compares answer dicts that carry an
    # answer_id, so two humans giving the same string are still distinct.
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        total += min(1.0, matches / 3)
    return total / len(gts)
