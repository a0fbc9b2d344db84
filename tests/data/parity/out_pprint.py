import pprint
pprint.pprint({'b': [1, 2, {'c': 3}], 'a': 'x' * 30, 'z': list(range(20))})
