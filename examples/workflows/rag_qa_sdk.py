"""The rag-qa workflow written with the Python SDK; it builds the same spec as rag-qa.yaml.

Run it to print the spec as YAML:  python examples/workflows/rag_qa_sdk.py
"""

from __future__ import annotations

from common.workflow.sdk import Workflow, tasks
from common.workflow.spec import WorkflowSpec


def build() -> WorkflowSpec:
    with Workflow("rag-qa", description="Answer a question from the most similar passages of a document "
                                        "corpus.") as wf:
        question = wf.input("question", "text", description="The question to answer.")
        corpus = wf.input("corpus", "file", description='A JSONL file of {"id": ..., "text": ...} records.')
        docs = tasks.load_documents(corpus, name="load")
        query = tasks.embed(question, name="embed_question")
        passages = tasks.embed(text=docs.texts, map="text", name="embed_passages")  # fan-out
        hits = tasks.retrieve(query=query, embeddings=passages, documents=docs.documents)  # fan-in
        answer = tasks.chat(question=question, context=hits.texts, name="answer")
        wf.output("answer", answer)
        wf.output("passages", hits.passages)
    return wf.build()


if __name__ == "__main__":
    import yaml

    print(yaml.safe_dump(build().to_dict(), sort_keys=False), end="")
