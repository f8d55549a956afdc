"""What the task tests share: sample text and small writers of task files in public datasets' shapes."""

from pathlib import Path

CHINESE = "北京是中国的首都，也是政治和文化中心。上海是中国最大的城市，位于长江入海口。长城很长。"
FILLER = "The river runs past the old mill and the green field under a grey sky. "


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def squad(paragraphs: list[tuple[str, list[dict]]]) -> dict:
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs]}]}


def qa_item(qid: str, question: str, context: str, answer: str, start: int | None = None) -> dict:
    start = context.index(answer) if start is None else start
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}]}
