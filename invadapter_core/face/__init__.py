"""Face stage: detect and crop faces, recognise them (identity embeddings), score and draw the scores."""
