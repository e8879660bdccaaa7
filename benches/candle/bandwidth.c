/* Read bandwidth of one core for working sets of 256 KB to 64 MB: a streaming
 * sum of f32s, four AVX accumulators, best of 5 (the ceiling for one token of
 * a layer whose active weights are that large; see README, "Against candle").
 *   gcc -O2 -mavx2 benches/candle/bandwidth.c -o /tmp/bw && taskset -c 0 /tmp/bw */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  size_t sizes[]={256<<10, 1<<20, 3145728, 8<<20, 64<<20};
  for(int s=0;s<5;s++){
    size_t n=sizes[s]/4; float*a=aligned_alloc(64,n*4); for(size_t i=0;i<n;i++)a[i]=i*1e-9f;
    __m256 acc0=_mm256_setzero_ps(),acc1=acc0,acc2=acc0,acc3=acc0;
    int reps=(int)(2e9/sizes[s]); if(reps<3)reps=3;
    double best=1e9;
    for(int k=0;k<5;k++){double t=now();
      for(int r=0;r<reps;r++) for(size_t i=0;i<n;i+=32){acc0=_mm256_add_ps(acc0,_mm256_load_ps(a+i));acc1=_mm256_add_ps(acc1,_mm256_load_ps(a+i+8));acc2=_mm256_add_ps(acc2,_mm256_load_ps(a+i+16));acc3=_mm256_add_ps(acc3,_mm256_load_ps(a+i+24));}
      t=now()-t; if(t<best)best=t;}
    float o[8];_mm256_storeu_ps(o,_mm256_add_ps(_mm256_add_ps(acc0,acc1),_mm256_add_ps(acc2,acc3)));
    printf("%8zu KB: %.1f GB/s (%g)\n", sizes[s]>>10, (double)sizes[s]*reps/best/1e9, o[0]);
    free(a);
  }
}
