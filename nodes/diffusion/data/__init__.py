"""Data files shipped with the diffusion code (a package so that installs include them)."""
