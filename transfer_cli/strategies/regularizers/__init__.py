"""Regularizers: loss terms any strategy can hold (`regularizers=[l2sp,bss]`, see `base`), and the flat
strategies of the same names (fine-tuning with one term, `flat`): l2sp, delta, bss, co_tuning, lwf,
stochnorm, bi_tuning, hybrid_forward, l2t_ww."""
