print(divmod(-7, 2), -7 // 2, -7 % 2, divmod(10**30, -7))
