"""Target-aware pruning (TransTailor) and its structural back ends: CNN channels (`cnn`) and transformer
heads and FFN units (`transformer`)."""
