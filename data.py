"""Math problems for EchoRL: benchmark loaders and a generic training-file loader.

Every source file is turned into a list of `Problem(id, question, answer)`, where `answer` is the
gold *final* answer (already pulled out of worked solutions), ready for `reward.verify`.
Benchmarks are looked up by name in `BENCHMARKS`; paths are relative to the data dir
(the repo's `../shared/data`, see its SOURCES.md for the provenance and fields of each file).
"""
from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import reward


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # gold final answer, e.g. "\\frac{14}{3}" or "18"
    solution: str = ""  # a worked solution, where the source has one (tiny.py's SFT targets)


class DataError(ValueError):
    """A data file that cannot be read as problems; the message names the file (and line or element)."""


class _BadRow(Exception):
    """A row that cannot be turned into a Problem; re-raised as DataError with file and line."""


MAX_QUESTION_CHARS = 16000  # default bound on a question's length (3x the longest in ../shared/data)


# ---------------------------------------------------------------------------------------------
# answer rendering: raw JSON value -> gold answer string

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _strip_math_delims(s: str) -> str:
    # Some files wrap answers in $...$ (or several segments, "$48$, $384$"); the delimiters are
    # not part of the answer. Escaped "\$" is a literal dollar sign and stays.
    return _UNESCAPED_DOLLAR.sub("", s).strip()


def _number(x: float | int) -> str:
    # 27.0 -> "27" (AMC23, SVAMP and MAWPS store integer answers as floats), 1.84 -> "1.84"
    return str(int(x)) if float(x).is_integer() else str(x)


def _boxed(solution: str) -> str | None:
    answer = reward.extract_answer(solution, last_number=False)
    # "...so the answer is $\boxed{}$." (an empty box, 2 MATH train rows) must not yield the
    # text "$\boxed{}$" through extract_answer's "answer is" fallback
    return None if answer is None or "\\boxed" in answer else _strip_math_delims(answer)


def _plain(value: Any) -> str | None:
    """Numbers, strings and lists of answers (several answers are joined with ", ")."""
    if isinstance(value, bool):
        raise _BadRow(f"answer is a boolean ({value})")
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, list):
        parts = [_plain(v) for v in value]
        return ", ".join(p for p in parts if p)
    if isinstance(value, str):
        return _strip_math_delims(value)
    raise _BadRow(f"answer has unsupported type {type(value).__name__}")


def _gsm8k(value: str) -> str | None:
    # "...worked solution...\n#### 1,000" -> "1000"
    if "####" not in value:
        return None
    return value.rsplit("####", 1)[1].strip().replace(",", "")


def _solution(value: str) -> str | None:
    return _boxed(value) if isinstance(value, str) else None


def _asdiv(value: str) -> str | None:
    # "9 (apples)" -> "9"; non-numeric answers ("Mrs. Hilt", "3:30 p.m.") are kept as they are
    return re.sub(r"\s*\([^()]*\)\s*$", "", value).strip() or value.strip()


def _letter(value: int) -> str:
    return "ABCDEFGHIJ"[value]


def _auto_answer(value: Any) -> str | None:
    """Answer rendering for files of unknown origin: GSM8K '####', \\boxed{} or plain value."""
    if isinstance(value, str) and re.search(r"(^|\n)\s*####", value):
        return _gsm8k(value)
    if isinstance(value, str) and "\\boxed" in value:
        return _boxed(value)
    return _plain(value)


# ---------------------------------------------------------------------------------------------
# question builders: row -> question text (a missing key raises KeyError, reported by name)

QuestionFn = Callable[[dict], str]


def _field(key: str) -> QuestionFn:
    return lambda row: row[key]


def _joined(*keys: str) -> QuestionFn:
    # SVAMP/ASDiv split the story ("Body") from the question sentence
    return lambda row: " ".join(str(row[k]).strip() for k in keys)


def _olympiad(row: dict) -> str:
    context = row["context"]
    return f"{context}\n{row['question']}" if context else row["question"]


def _with_options(row: dict) -> str:
    # multiple choice (AQuA: list of "A)..." strings, SAT: one "A) ... B) ..." string)
    options = row["options"]
    text = " ".join(options) if isinstance(options, list) else str(options)
    return f"{row['question']}\nAnswer Choices: {text}"


def _with_choices(row: dict) -> str:
    # MMLU-STEM: plain list of choices, gold is an index
    text = " ".join(f"({_letter(i)}) {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question']}\nAnswer Choices: {text}"


def _with_option_dict(row: dict) -> str:
    text = " ".join(f"({k}) {v}" for k, v in row["options"].items())
    return f"{row['question']}\nAnswer Choices: {text}"


# ---------------------------------------------------------------------------------------------
# registry

@dataclass(frozen=True)
class FileBenchmark:
    path: str                                 # relative to data_dir
    question: QuestionFn
    answer_key: str | tuple[str, ...]         # several: the first non-empty one is the gold
    answer: Callable[[Any], str | None] = _plain
    id_key: str | None = None                 # a unique per-row id field; else the row index
    skip_unlabeled: bool = False              # drop rows with no gold answer (warn) instead of failing


LoaderFn = Callable[[Path, int | None], list[Problem]]  # (data_dir, limit) -> problems

Q, P = _field("question"), _field("problem")
BENCHMARKS: dict[str, FileBenchmark | LoaderFn] = {
    "math500": FileBenchmark("math500/test.jsonl", P, "answer", id_key="unique_id"),
    # 2 train solutions end in an empty \boxed{} (number_theory/7115, 7117): dropped with a warning
    "math_train": FileBenchmark("math/train.jsonl", P, "solution", _solution, "unique_id",
                                skip_unlabeled=True),
    "math_test": FileBenchmark("math/test.jsonl", P, "solution", _solution, "unique_id"),
    "gsm8k": FileBenchmark("gsm8k/test.jsonl", Q, "answer", _gsm8k),
    "gsm8k_train": FileBenchmark("gsm8k/train.jsonl", Q, "answer", _gsm8k),
    "aime24": FileBenchmark("aime24/test.jsonl", P, "answer", id_key="id"),
    "amc23": FileBenchmark("amc23/test.jsonl", P, "answer", id_key="id"),
    "minerva_math": FileBenchmark("minerva_math/test.jsonl", P, "solution", _solution, "idx"),
    "olympiadbench": FileBenchmark("olympiadbench/test.jsonl", _olympiad, "final_answer",
                                   id_key="id"),
    "college_math": FileBenchmark("college_math/test.jsonl", Q, "answer"),
    # lines 168 and 193 have an empty answer (it was left inside the question text)
    "gaokao2023en": FileBenchmark("gaokao2023en/test.jsonl", Q, "answer", skip_unlabeled=True),
    "svamp": FileBenchmark("svamp/test.jsonl", _joined("Body", "Question"), "Answer", id_key="ID"),
    "asdiv": FileBenchmark("asdiv/test.jsonl", _joined("body", "question"), "answer", _asdiv, "idx"),
    "mawps": FileBenchmark("mawps/test.jsonl", _field("input"), "target", id_key="idx"),
    **{f"mawps_{s}": FileBenchmark(f"mawps/{s}.jsonl", _field("input"), "target")
       for s in ("addsub", "multiarith", "singleeq", "singleop")},
    "aqua": FileBenchmark("aqua/test.jsonl", _with_options, "correct"),
    "sat_math": FileBenchmark("sat_math/test.jsonl", _with_options, "Answer", id_key="id"),
    "mmlu_stem": FileBenchmark("mmlu_stem/test.jsonl", _with_choices, "answer", _letter),
    "carp_en": FileBenchmark("carp_en/test.jsonl", _field("content"), "answer"),
    "cmath": FileBenchmark("cmath/test.jsonl", Q, "answer"),
    "cn_middle_school": FileBenchmark("cn_middle_school/test.jsonl", Q, "answer", id_key="idx"),
    "gaokao2024_I": FileBenchmark("gaokao2024_I/test.jsonl", Q, "answer"),
    "gaokao2024_II": FileBenchmark("gaokao2024_II/test.jsonl", Q, "answer"),
    # the option letter for multiple-choice rows, the value for fill-in-the-blank rows
    "gaokao2024_mix": FileBenchmark("gaokao2024_mix/test.jsonl", Q, ("choice_answer", "answer"),
                                    id_key="idx"),
    "gaokao_math_cloze": FileBenchmark("gaokao_math_cloze/test.jsonl", Q, "answer"),
    "gaokao_math_qa": FileBenchmark("gaokao_math_qa/test.jsonl", _with_option_dict, "label"),
    # 4 of its 7474 rows have a null or empty answer; they cannot be rewarded, so they are dropped
    "deepscaler_math": FileBenchmark("deepscaler/train/math.json", P, "answer", skip_unlabeled=True),
    "deepscaler_aime": FileBenchmark("deepscaler/train/aime.json", P, "answer"),
}


def register_benchmark(name: str, loader: FileBenchmark | LoaderFn) -> None:
    """Add a benchmark: a FileBenchmark, or a function (data_dir, limit) -> list[Problem] that
    may need no file at all. (The embedded task's held-out split, "tiny", depends on the run's
    task settings, so eval.load_benchmarks resolves it, not this table.)"""
    BENCHMARKS[name] = loader


# ---------------------------------------------------------------------------------------------
# reading

def _read_rows(path: Path) -> Iterator[tuple[str, int, dict]]:
    """Yield (location for messages, row index, row) from a .jsonl file or a .json array."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: bad JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
        located = ((f"{path}: element {i}", row) for i, row in enumerate(rows))
    else:
        located = _jsonl_rows(path)
    for index, (where, row) in enumerate(located):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, index, row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield f"{path}: line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: bad JSON: {e.msg}") from None


def _first_value(row: dict, keys: str | tuple[str, ...]) -> Any:
    keys = (keys,) if isinstance(keys, str) else keys
    for k in keys:
        if k not in row:
            raise KeyError(k)
    return next((row[k] for k in keys if row[k] not in (None, "")), row[keys[-1]])


def _load_file(path: Path, spec: FileBenchmark, limit: int | None,
               max_question_chars: int = MAX_QUESTION_CHARS) -> list[Problem]:
    problems: list[Problem] = []
    unlabeled: list[str] = []
    for where, index, row in _read_rows(path):
        if limit is not None and len(problems) >= limit:
            break
        try:
            question = spec.question(row)
            raw = _first_value(row, spec.answer_key)
            answer = None if raw is None else spec.answer(raw)
        except KeyError as e:
            raise DataError(f"{where}: missing field {e.args[0]!r}") from None
        except (_BadRow, IndexError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: bad field {spec.answer_key!r}: {e}") from None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty question")
        if len(question) > max_question_chars:
            raise DataError(f"{where}: the question has {len(question):,} characters, over the bound of "
                            f"{max_question_chars:,} (data.max_question_chars)")
        if not answer and spec.skip_unlabeled:
            unlabeled.append(where)
            continue
        if not answer:
            raise DataError(f"{where}: no gold answer in field {spec.answer_key!r} (null, empty, or "
                             f"no final answer found in {str(raw)[:80]!r}); skip_unlabeled=True drops such rows")
        pid = str(row[spec.id_key]) if spec.id_key and spec.id_key in row else str(index)
        problems.append(Problem(pid, question.strip(), answer))
    if unlabeled:
        warnings.warn(f"{path}: skipped {len(unlabeled)} rows without a gold answer "
                      f"({'; '.join(unlabeled[:3])})", stacklevel=3)
    return problems


def load_benchmark(name: str, data_dir: str | Path, limit: int | None = None,
                   max_question_chars: int = MAX_QUESTION_CHARS) -> list[Problem]:
    """Problems of a registered benchmark, in file order; `limit` keeps the first `limit`."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}, tiny (the embedded task), "
                        f"or a .jsonl/.json file of problems")
    loader = BENCHMARKS[name]
    if isinstance(loader, FileBenchmark):
        return _load_file(Path(data_dir) / loader.path, loader, limit, max_question_chars)
    return loader(Path(data_dir), limit)


# ---------------------------------------------------------------------------------------------
# generic training files

QUESTION_KEYS = ("problem", "question", "input", "prompt", "query", "content")
ANSWER_KEYS = ("final_answer", "answer", "target", "solution")  # "answer" beats a worked solution
ID_KEYS = ("unique_id", "id", "idx")


def _first_row(path: Path) -> dict:
    for _, _, row in _read_rows(path):
        return row
    raise DataError(f"{path}: no rows")


def load_problems(path: str | Path, question_key: str | None = None,
                  answer_key: str | None = None, limit: int | None = None,
                  skip_unlabeled: bool = True, max_question_chars: int = MAX_QUESTION_CHARS) -> list[Problem]:
    """Problems from a .jsonl file or a .json array of objects.

    Keys are detected from the first row unless given. The answer may be a plain value, a GSM8K
    solution ending in '#### X', or a worked solution whose last \\boxed{} is the answer.
    Ids come from unique_id/id/idx when those are unique, else the row index. A row without a
    gold answer (null, empty, or an empty \boxed{} as in 2 MATH train rows) cannot be rewarded:
    it is dropped with a warning when `skip_unlabeled` (the default), else it is an error.
    A file with no labeled row at all is always an error (most likely a wrong answer_key).
    """
    path = Path(path)
    first = _first_row(path)

    def pick(given: str | None, candidates: tuple[str, ...], what: str) -> str:
        if given is not None:
            return given
        found = next((k for k in candidates if k in first), None)
        if found is None:
            raise DataError(f"{path}: no {what} field among {list(first)}; expected one of "
                             f"{list(candidates)} (or pass {what}_key=...)")
        return found

    qk, ak = pick(question_key, QUESTION_KEYS, "question"), pick(answer_key, ANSWER_KEYS, "answer")
    id_key = next((k for k in ID_KEYS if k in first), None)
    render = _solution if ak == "solution" else _auto_answer  # a worked solution must hold a \boxed{}
    problems = _load_file(path, FileBenchmark(str(path), _field(qk), ak, render, id_key, skip_unlabeled), limit,
                          max_question_chars)
    if not problems and limit != 0:
        raise DataError(f"{path}: no row has a gold answer in field {ak!r}")
    if len({p.id for p in problems}) < len(problems):  # ids must be unique for eval caching
        problems = [Problem(str(i), p.question, p.answer) for i, p in enumerate(problems)]
    return problems


class ListStream:
    """Shuffled passes over a fixed problem list; resumable."""

    def __init__(self, problems, seed: int, shuffle: bool = True):
        self.problems, self.seed, self.shuffle, self.pos = problems, seed, shuffle, 0
        self._order = (-1, [])  # (epoch, permutation), rebuilt once per pass

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            perm = list(range(len(self.problems)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(perm)
            self._order = (epoch, perm)
        return self._order[1]

    def next(self, n: int):
        out = []
        for _ in range(n):
            epoch, i = divmod(self.pos, len(self.problems))
            out.append(self.problems[self.order(epoch)[i]])
            self.pos += 1
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]
