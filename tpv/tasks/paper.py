"""The paper's 19 datasets (Belanec et al., arXiv 2408.01119) as built-in tasks read from the Hugging Face hub.

Each task pairs a ``TaskSpec`` (the paper's ``*_text`` variant: its input text and label words, in the hub's
label order) with a ``HubSource`` (current hub id, config, which official split is the held-out set).
``tpv data fetch`` prepares them through ``tpv.hub_data`` exactly like the bundled tasks.

Split protocol (the paper's ``split_validation_test``), seeded and stratified by label: a train pool of at least
10,000 rows gives 1,000 of them as validation and the official held-out split is the test set; a smaller one keeps
its whole train pool and the held-out split is halved into validation and test. GLUE's test splits carry label -1
and are never read; SNLI's rows without a gold label (-1) are dropped.

Names: the paper's, except where a bundled stand-in already holds it (``imdb``, ``trec_fine``): those take the
paper code's own ``_text`` name. TREC fine's label 31 (HUM:desc) is "person description": the paper's list repeats
"description" (DESC:desc), and label words must be distinct here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tpv.tasks.spec import SplitProtocol, TaskSpec

PAPER = SplitProtocol(stratify=True)  # the paper's protocol, stratified as its train_test_split(stratify_by_column)
UNSTRATIFIED = SplitProtocol()  # regression and free-text answers have no classes to stratify by


class HubSource(BaseModel):
    """Where a paper task's rows live on the hub and how its label column reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: also its folder in a mirror
    config: str | None = None
    train: str = "train"
    heldout: str  # the official split the protocol calls the original validation set
    label_column: str = "label"
    label_values: list[str] = []  # when the label column holds strings: the raw value of each label, in order

    @property
    def hub_id(self) -> str:
        return self.repo if self.config is None else f"{self.repo} ({self.config})"


_GLUE = "nyu-mll/glue"
_SENTIMENT = ["negative", "positive"]
_NLI3 = ["entailment", "neutral", "contradiction"]
_TREC_FINE = [
    "abbreviation", "expression abbreviated", "an animal", "an organ of the body", "a color", "creative piece",
    "currency", "disease or medicine", "event", "food", "musical instrument", "language", "letter", "other entity",
    "plant", "product", "religion", "sport", "substance", "symbol", "technique", "term", "vehicle", "word",
    "definition", "description", "manner of action", "reason", "group", "individual", "title",
    "person description", "city", "country", "mountain", "other location", "state", "code", "count", "date",
    "distance", "price", "order", "other number", "period of time", "percentage", "speed", "temperature", "size",
    "weight",
]
_DBPEDIA = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean Of Transportation",
            "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
_YAHOO = ["Society", "Science", "Health", "Education", "Computers", "Sports", "Business", "Entertainment", "Family",
          "Politics"]


def _task(name: str, family: str, description: str, source: HubSource, template: str, labels: list[str],
          metric: str, **extra) -> tuple[TaskSpec, HubSource]:
    spec = TaskSpec(name=name, family=family, description=f"{description} (paper task; hub {source.hub_id})",
                    source=f"Hugging Face hub: {source.hub_id}", template=template, labels=labels, metric=metric,
                    split=extra.pop("split", PAPER if labels else UNSTRATIFIED), **extra)
    return spec, source


def _glue(config: str, heldout: str = "validation") -> HubSource:
    return HubSource(repo=_GLUE, config=config, heldout=heldout)


_PAIRS = [
    _task("mnli", "nli", "MultiNLI; test = validation_matched", _glue("mnli", "validation_matched"),
          "premise: {premise} hypothesis: {hypothesis}", _NLI3, "macro_f1"),
    _task("qqp", "paraphrase", "Quora Question Pairs", _glue("qqp"),
          "question1: {question1} question2: {question2}", ["not_duplicate", "duplicate"], "f1"),
    _task("qnli", "qa_nli", "Question NLI", _glue("qnli"),
          "question: {question} sentence: {sentence}", ["entailment", "not_entailment"], "f1"),
    _task("sst2", "sentiment", "Stanford Sentiment Treebank, binary", _glue("sst2"),
          "sentence: {sentence}", _SENTIMENT, "f1"),
    _task("stsb", "similarity", "STS Benchmark, similarity 0-5 (regression)", _glue("stsb"),
          "sentence1: {sentence1} sentence2: {sentence2}", [], "pearson"),
    _task("mrpc", "paraphrase", "Microsoft Research Paraphrase Corpus", _glue("mrpc"),
          "sentence1: {sentence1} sentence2: {sentence2}", ["not_equivalent", "equivalent"], "f1"),
    _task("rte", "nli", "Recognizing Textual Entailment", _glue("rte"),
          "sentence1: {sentence1} sentence2: {sentence2}", ["entailment", "not_entailment"], "f1"),
    _task("cola", "acceptability", "Corpus of Linguistic Acceptability", _glue("cola"),
          "sentence: {sentence}", ["unacceptable", "acceptable"], "f1"),
    _task("scitail", "nli", "SciTail entailment (snli_format); test = its test split",
          HubSource(repo="allenai/scitail", config="snli_format", heldout="test", label_column="gold_label",
                    label_values=["entailment", "neutral"]),
          "premise: {sentence1} hypothesis: {sentence2}", ["entailment", "neutral"], "f1"),
    _task("snli", "nli", "Stanford NLI; test = its test split, rows without a gold label dropped",
          HubSource(repo="stanfordnlp/snli", config="plain_text", heldout="test"),
          "premise: {premise} hypothesis: {hypothesis}", _NLI3, "macro_f1"),
    _task("dbpedia", "topic", "DBpedia ontology, 14 classes",
          HubSource(repo="fancyzhx/dbpedia_14", config="dbpedia_14", heldout="test"),
          "What is the category for following text: title: {title} content: {content}", _DBPEDIA, "macro_f1",
          max_chars={"content": 1000}),
    _task("trec_coarse", "question_type", "TREC question classification, 6 coarse classes; test split halved",
          HubSource(repo="CogComp/trec", heldout="test", label_column="coarse_label"),
          "What is this question asking for: {text}",
          ["Abbreviation", "Entity", "Description", "Person", "Location", "Quantity"], "macro_f1"),
    _task("trec_fine_text", "question_type", "TREC question classification, 50 fine classes; test split halved",
          HubSource(repo="CogComp/trec", heldout="test", label_column="fine_label"),
          "sentence: {text}", _TREC_FINE, "macro_f1"),
    _task("ag_news", "topic", "AG News, 4 topics", HubSource(repo="fancyzhx/ag_news", heldout="test"),
          "What is the category for following text: {text}", ["World", "Sports", "Business", "Sci/Tech"],
          "macro_f1"),
    _task("yahoo", "topic", "Yahoo! Answers topics, 10 classes",
          HubSource(repo="community-datasets/yahoo_answers_topics", config="yahoo_answers_topics", heldout="test",
                    label_column="topic"),
          "What is the category for following text: title: {question_title} content: {question_content} "
          "answer: {best_answer}", _YAHOO, "macro_f1", max_chars={"question_content": 600, "best_answer": 600}),
    _task("yelp_polarity", "sentiment", "Yelp review polarity",
          HubSource(repo="fancyzhx/yelp_polarity", config="plain_text", heldout="test"),
          "sentence: {text}", _SENTIMENT, "f1", max_chars={"text": 1000}),
    _task("sst5", "sentiment", "SST fine-grained, 5 classes; validation (dev) halved",
          HubSource(repo="SetFit/sst5", heldout="validation"), "sentence: {text}",
          ["very negative", "negative", "neutral", "positive", "very positive"], "macro_f1"),
    _task("imdb_text", "sentiment", "IMDB movie reviews; test = its test split",
          HubSource(repo="stanfordnlp/imdb", config="plain_text", heldout="test"),
          "sentence: {text}", _SENTIMENT, "f1", max_chars={"text": 1000}),
    _task("squad_v2", "qa", "SQuAD 2.0 extractive QA; unanswerable questions answer 'unanswerable'",
          HubSource(repo="rajpurkar/squad_v2", config="squad_v2", heldout="validation"),
          "question: {question} context: {context}", [], "squad_f1"),
    _task("math", "math", "MATH competition problems; the target is the worked solution, scored on its \\boxed "
          "final answer; test split halved",
          HubSource(repo="DigitalLearningGmbH/MATH-lighteval", config="default", heldout="test"),
          "Solve the math problem. Problem: {problem}", [], "math_exact"),
]

PAPER_TASKS: list[TaskSpec] = [spec for spec, _ in _PAIRS]
HUB_SOURCES: dict[str, HubSource] = {spec.name: source for spec, source in _PAIRS}
