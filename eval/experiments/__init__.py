"""The experiments' measurements, one module per experiment: what each experiment's summary
computes from its runs' outputs (the paired contrasts, the decision rules, the tables and
figures). The command lines in scripts/ parse flags, call these and write or print the results.

    composition   Exp 4, several persona diffs merged at once: additive slopes, cross-talk
    prevention    Exp 3, preventative steering: the training configs and the drift summary
    distillation  Exp 5, distilling activation steering into a LoRA: the rank sweep's summary
    ab_fewshot    judge-free A/B choices and the few-shot extraction setting they depend on
    cross_source  a trait's prompt-derived and public-derived persona diffs, cross-evaluated and compared
    external_prediction  Exp 2 on public finetuning data: the two projection runs' summary, Holm over them
"""
