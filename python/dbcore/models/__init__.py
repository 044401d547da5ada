"""Network code the recipes share: adaLN transformer layers, the DiT network, text-model parts and
the token-ancestral chain's likelihood. Pure torch."""
