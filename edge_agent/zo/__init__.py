"""Zeroth-order building blocks for the FedZO and FZooS learners (numpy only, never torch).

- `gp`: GP posterior, analytic mean gradient (SE, Matérn-5/2), gradient-variance trace score;
- `rff`: shared random Fourier features drawn from PCG64(seed), n×n ridge solve, surrogate gradient;
- `objectives`: query-counting wrappers, the FZooS quadratic, macro-F1, vector <-> tensors;
- `problem`: task config + data + model -> counted objective over a flat vector;
- `optim`: SGD and Adam on flat vectors.
"""
