import statistics
print(statistics.mean([1, 2, 3, 4]), statistics.stdev([1.5, 2.5, 2.5, 2.75, 3.25, 4.75]))
