from concurrent.futures import ThreadPoolExecutor, as_completed
with ThreadPoolExecutor(4) as ex:
    futures = [ex.submit(pow, 2, i) for i in range(10)]
    print(sorted(f.result() for f in as_completed(futures)))
    bad = ex.submit(lambda: 1 / 0)
    print(type(bad.exception()).__name__)
