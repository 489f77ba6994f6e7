"""What a researcher reads after a run: heat-map panels, score histograms."""
