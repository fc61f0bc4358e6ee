"""Training in the loop (`python -m shared.runner loop`): an annotation tool's answers ingested in committed chunks,
a model finetuned on them round after round, judged on a held-out set and exported when it is no worse.

- `rounds`: a round from start to finish (ingest, round 0, finetune, judge, export, collect), `run_rounds`;
- `folder`: the loop folder's files and the `Loop` a session works on; `state`: state.json and the answers ledger;
- `ingest`: answers read in chunks into shard sets; `shards`: the shard sets; `garbage`: what no round needs any more;
- `report`: rounds.csv and rounds.png; `support`: what a task supplies (`Task.loop_support()`), the loop naming none;
- `pool`: the unlabelled images' annotation tasks, rewritten after each round, least sure first (`--pool`).
"""
