"""Building blocks that take explicit arguments; only family files read configs."""
