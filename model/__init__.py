"""Model-side code: backbone loading, ShifCon math, subspace metric, Lens, XTransplant."""
