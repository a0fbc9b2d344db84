x = 3 ** 200
print(x.bit_length(), hex(x)[:20], x.to_bytes(40, 'big')[:4])
