raise ValueError('ошибка ✗')
