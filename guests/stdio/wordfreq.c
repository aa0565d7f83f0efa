/*
 * Word frequencies over stdin in C, an ordinary program with no wasnap code or import:
 * `fgets` reads lines, a malloc'ed chained hash table counts words, `printf` writes.
 * wasnap runs it unmodified in stdio mode (`wasnap run --stdio`).
 *
 * For each input line it prints `<line number> <distinct words> <word>=<count> ...`; at
 * the end a summary line.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 8192

struct entry {
    struct entry *next;
    unsigned long count;
    char word[];
};

static struct entry *table[BUCKETS];
static unsigned long distinct;

static uint32_t hash(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

static unsigned long count(const char *word) {
    struct entry **slot = &table[hash(word) % BUCKETS];
    for (struct entry *e = *slot; e; e = e->next)
        if (strcmp(e->word, word) == 0) return ++e->count;
    size_t n = strlen(word);
    struct entry *e = malloc(sizeof *e + n + 1);
    if (!e) abort();
    memcpy(e->word, word, n + 1);
    e->count = 1;
    e->next = *slot;
    *slot = e;
    distinct++;
    return 1;
}

int main(void) {
    static char line[4096];
    unsigned long lines = 0;
    while (fgets(line, sizeof line, stdin)) {
        lines++;
        printf("%lu", lines);
        char *save = NULL;
        static char counted[8192];
        size_t used = 0;
        counted[0] = 0;
        for (char *w = strtok_r(line, " \t\r\n", &save); w; w = strtok_r(NULL, " \t\r\n", &save)) {
            unsigned long c = count(w);
            int m = snprintf(counted + used, sizeof counted - used, " %s=%lu", w, c);
            if (m > 0 && (size_t)m < sizeof counted - used) used += (size_t)m;
        }
        printf(" %lu%s\n", distinct, counted);
    }
    printf("# %lu lines, %lu distinct words\n", lines, distinct);
    return 0;
}
