"""The programs built on the library: dino-train, dino-eval-knn, dino-eval-linear,
dino-visualize-attention, dino-plot-curves. The library never imports this package."""
