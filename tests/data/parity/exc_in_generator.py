def g():
    yield 1
    raise RuntimeError('gen failed')

for x in g():
    print(x)
