"""Statistics per layer and expert: the calibration job and its resume (run), the float64 sums and the stats file (stats), the greedy re-routing search (greedy)."""
