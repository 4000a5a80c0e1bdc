"""The stages of one experiment, each a function with its config: `generate` (a teacher's
data), `filter`, `train` (a student; `train_config` holds its settings without torch,
`train_many` trains several as one, `checkpoint` resumes one), `evaluate` (forced-choice trait
shares), `evaluate_pairs` and `judge` (misalignment), `finetune_api` (students through an
API). Their public functions are exported by `sublearn` itself (`sublearn.generate`,
`sublearn.train`, ...); here the names would be shadowed by the modules of the same names."""
