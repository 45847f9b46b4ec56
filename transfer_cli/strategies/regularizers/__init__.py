"""Regularizers: loss terms any strategy can hold (`regularizers=[l2sp,bss]`, see `base`), and the flat
strategies `l2sp`, `delta`, `bss` (fine-tuning with one term, `flat`)."""
