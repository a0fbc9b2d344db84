print(float('inf'), -float('inf'), float('nan'), -0.0, 0.0 == -0.0)
