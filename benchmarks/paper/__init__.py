"""The s-DIET paper's checks: gradient cosine (Table 10), toy model (Fig. 4), label smoothing (Fig. 14)."""
