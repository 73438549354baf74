"""What the student is trained towards: source selection, the fusion rule and the losses.

`selection` is the selector network S(x) with noisy top-k and its prefit; `losses` holds the
fusion rule (dynamic weights over the selected sources, the fused sparse target on the union
support) and every loss: the sparse KL and other divergences, the student loss, the selector's
regression and feedback (balancing) losses. `methods` is the table of methods (the baselines and
the selector) as settings of one rule; `srft_losses` are the SRFT stage's objectives.
"""
